"""The orchestration side: probing, extraction, dispatch, monitoring, encoding, the esrfarm CLI."""
