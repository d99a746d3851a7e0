"""The job service (``esrfarm serve``): a persistent queue of upscaling jobs run on one shared fleet."""
