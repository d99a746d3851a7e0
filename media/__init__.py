"""The media edge: ffmpeg and PyAV (probe, decode, encode, segments), shared by the coordinator
and the worker."""
