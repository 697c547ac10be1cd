"""Test fixtures only: where the real test data lives (:mod:`.data`), the browser driver for the frontend test
(:mod:`.browser`) and the tiny LoRA / SD2.x / SDXL checkpoints (:mod:`.tiny_lora`, :mod:`.tiny_models`). No shipped
module imports it (tests/test_packaging.py enforces the layering); it is not in the wheel."""
