"""Engine: requests, scheduler, block manager, step loop, asyncio bridge, sampler."""
