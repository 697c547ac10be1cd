"""``python -m cxr_counterfactual <command>`` (also the ``cxr-counterfactual`` console script)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "demo": "run one masked counterfactual edit of a real radiograph in a headless ComfyUI",
    "convert-diffusers": "convert a diffusers SD1.x pipeline folder (e.g. RoentGen) into one ComfyUI checkpoint",
    "run": "run an API workflow, or a manifest of rows (resumable; several servers or Ray), headless",
    "report": "turn a batch's output folder into one self-contained HTML report (tables, plots, thumbnails)",
    "tiny-checkpoint": "build the tiny random-weight SD1.5-shaped test checkpoint (needs ComfyUI)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        lines = [f"  {name:<16} {text}" for name, text in COMMANDS.items()]
        sys.stderr.write("usage: python -m cxr_counterfactual <command> [options]\n" + "\n".join(lines) + "\n")
        return 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from .demo.run import main as demo_main

        return demo_main(rest)
    if command == "run":
        try:
            from .runner.cli import main as run_main
        except ModuleNotFoundError as err:  # websocket-client: the runner's one dependency beyond the pack's
            sys.stderr.write(f"{err.name} is not installed: pip install 'cxr-counterfactual[run]'\n")
            return 2
        return run_main(rest)
    if command == "report":
        from .report.cli import main as report_main

        return report_main(rest)
    if command == "convert-diffusers":
        from .hosts.comfy.convert_diffusers import main as convert_main

        return convert_main(rest)
    from .demo.tiny_checkpoint import main as tiny_main

    return tiny_main(rest)


if __name__ == "__main__":
    sys.exit(main())
