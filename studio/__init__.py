"""The face of PEFT Studio: Gradio UI, FastAPI /api, CLI. Settings and the database
layer live in `workers` (re-exported here) so a worker machine needs no web stack."""
