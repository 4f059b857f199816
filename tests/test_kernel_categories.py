"""The profile summary's kernel categories: Triton kernels by exact name, cuBLAS GEMMs by vendor markers, per step."""
from loramux.loadtest.bench.kernel_categories import by_category, category, format_categories


def test_categories_and_per_step_sums():
    assert category("_shrink_kernel") == "LoRA shrink"
    assert category("_expand_silu_kernel") == "LoRA expand + SiLU*mul"  # not taken for _expand_kernel
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64") == "GEMM"
    assert category("nvjet_tst_128x64_64x8_1x1_v_bz_TNT") == "GEMM"
    assert category("void at::native::elementwise_kernel<128, 2>") == "other"
    cats = by_category([("_shrink_kernel", 400.0, 640), ("_expand_kernel", 200.0, 320),
                        ("nvjet_tst_x", 5000.0, 640), ("_rms_norm_kernel", 100.0, 330)], steps=5)
    assert list(cats) == ["GEMM", "LoRA shrink", "LoRA expand", "add + RMSNorm"]  # largest first
    assert cats["LoRA shrink"] == (80.0, 128.0) and cats["GEMM"] == (1000.0, 128.0)
    table = format_categories(cats, "decode")
    assert "| LoRA shrink | 80.0 | 7% | 128 |" in table and table.startswith("decode: 1140 us")


def test_top_kernels_orders_by_time_per_step():
    class _Ev:
        def __init__(self, key, us, count):
            self.key, self.self_device_time_total, self.count, self.device_type = key, us, count, "DeviceType.CUDA"

    class _Prof:
        def key_averages(self):
            return [_Ev("small", 10.0, 2), _Ev("big", 90.0, 4), _Ev("cpu_op", 0.0, 1)]

    from loramux.loadtest.bench.kernel_categories import top_kernels

    lines = top_kernels(_Prof(), 2, n=5).splitlines()
    assert lines[2] == "| big | 45.0 | 2 |" and lines[3] == "| small | 5.0 | 1 |" and len(lines) == 4
