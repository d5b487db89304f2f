"""The `megatron-wesar` command: `pretrain` (the driver), `preprocess` (indexed datasets),
`study` (methods x learning rates x seeds, then a report), `report` (re-render a study's report),
`demo` (README's main job: the study's tiny preset), `export` (fold the gates: a plain Megatron
checkpoint or a Hugging Face directory) and `import` (a WeSaR run from a Hugging Face model)."""
from __future__ import annotations

import sys

from .compat.notices import quiet_megatron_notices

DEMO_ARGS = ["--preset", "tiny", "--dir", "out/demo", "--rerun"]


def run_demo() -> int:
    """The study's tiny preset: 4 methods x 3 peak LRs on seed 1, seeds 2 and 3 at the selected
    LRs, TP=2 on two local CPU ranks, then the report (out/demo/report.md)."""
    import os
    import time

    from .study.runner import main as study_main

    start = time.perf_counter()
    code = study_main(DEMO_ARGS)
    report = os.path.abspath(os.path.join("out", "demo", "report.md"))
    if os.path.isfile(report):
        print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {report}")
    return code


def main(argv=None) -> int:
    """Dispatch `megatron-wesar <command> [args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_megatron_notices()
    commands = {"pretrain": _pretrain, "preprocess": _preprocess, "study": _study,
                "report": _report, "demo": lambda rest: run_demo(), "export": _export,
                "import": _import}
    if not argv or argv[0] not in commands:
        print(f"usage: megatron-wesar {{{','.join(commands)}}} [args]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _pretrain(rest) -> int:
    from .training.pretrain import main as pretrain_main

    return pretrain_main(rest)


def _preprocess(rest) -> int:
    from .data.preprocess import main as preprocess_main

    return preprocess_main(rest)


def _study(rest) -> int:
    from .study.runner import main as study_main

    return study_main(rest)


def _report(rest) -> int:
    from .study.report import main as report_main

    return report_main(rest)


def _export(rest) -> int:
    from .export.commands import export_main

    return export_main(rest)


def _import(rest) -> int:
    from .export.commands import import_main

    return import_main(rest)
