"""Paged KV-cache bookkeeping: a free list of fixed-size blocks with refcounts (pure Python, no torch)."""
from __future__ import annotations

from collections import deque

from .request import Request


class BlockManager:
    """Hands out KV-cache blocks to requests. Block ids index the runner's cache tensors."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(req.num_computed_tokens + num_new_tokens) - len(req.block_ids))

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req's block table to hold num_computed + num_new tokens; False (and no change) if short."""
        need = self.extra_blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block = self._free.popleft()
            self._refcount[block] = 1
            req.block_ids.append(block)
        return True

    def free(self, req: Request) -> None:
        """Drop req's references; blocks return to the free list when nobody holds them."""
        for block in reversed(req.block_ids):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                self._free.append(block)
            elif self._refcount[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
        req.block_ids = []

    def check_consistent(self) -> None:
        """Invariant used by tests: every block is either free (refcount 0) or held."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for block, rc in enumerate(self._refcount):
            if (rc == 0) != (block in free):
                raise AssertionError(f"block {block}: refcount {rc} but free={block in free}")
