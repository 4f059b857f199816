"""Device-resident LoRA slots: per-layer stacked A/B buffers for --max-loras adapters, and the per-step meta."""
from __future__ import annotations

import torch

from loramux.kernels.lora import LoRAMeta, build_lora_meta
from loramux.server.models.layers import LoRAStacks
from loramux.server.models.llama import LORA_TARGETS


class LoRASlots:
    """Allocates the stacks once (A [S, L*R, K], B [S, N, R] per packed linear and layer) and attaches them to
    the model's PackedLinear layers; load() writes one adapter into one slot. `table` maps ids to slots."""

    def __init__(self, model, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device, table):
        self.model, self.num_slots, self.max_rank, self.table = model, num_slots, max_rank, table
        self.device = torch.device(device)
        self.nbytes = 0
        for layer in model.layers:
            for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                lin = getattr(layer, attr)
                L, K, N = len(lin.slice_sizes), lin.in_features, lin.slice_offsets[-1]
                st = LoRAStacks(
                    a=torch.zeros(num_slots, L * max_rank, K, dtype=dtype, device=device),
                    b=torch.zeros(num_slots, N, max_rank, dtype=dtype, device=device),
                    ranks=torch.zeros(num_slots, L, dtype=torch.int32, device=device),
                    scales=torch.zeros(num_slots, L, dtype=torch.float32, device=device))
                self.nbytes += st.a.nbytes + st.b.nbytes
                lin.lora = st
        self._meta: LoRAMeta | None = None

    def slot_of(self, adapter_id: str) -> int:
        slot = self.table.lookup(adapter_id)
        return -1 if slot is None else slot

    def load(self, slot: int, adapter) -> None:
        """Copy a LoadedAdapter's (A [r, in], B [out, r], scale) into `slot`; untargeted slices get rank 0
        (padding past each rank is never read by the kernels, so it need not be cleared)."""
        for layer in self.model.layers:
            for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                st = getattr(layer, attr).lora
                st.ranks[slot].zero_()
                st.scales[slot].zero_()
        R = self.max_rank
        for (layer_idx, module), (a, b) in adapter.weights.items():
            attr, i = LORA_TARGETS[module]
            lin = getattr(self.model.layers[layer_idx], attr)
            st, r = lin.lora, a.shape[0]
            lo, hi = lin.slice_offsets[i], lin.slice_offsets[i + 1]
            st.a[slot, i * R:i * R + r].copy_(a, non_blocking=True)
            st.b[slot, lo:hi, :r].copy_(b, non_blocking=True)
            st.ranks[slot, i] = r
            st.scales[slot, i] = adapter.scales[(layer_idx, module)]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the slot is usable once its copy is done

    def build_meta(self, token_slots: torch.Tensor) -> LoRAMeta:
        """Group this step's tokens by slot, reusing one preallocated buffer set when it is big enough."""
        T = token_slots.shape[0]
        if self._meta is None or self._meta.max_tokens < T:
            self._meta = LoRAMeta.empty(max(T, 256), self.num_slots, self.device)
        return build_lora_meta(token_slots, self.num_slots, out=self._meta)
