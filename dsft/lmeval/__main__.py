"""``python -m dsft.lmeval``: lm-eval's own command line, with the ``dsft`` model registered.

    python -m dsft.lmeval run --model dsft --model_args base=tiny-deepseek-v2,adapter=finance@0.1.0 \\
        --tasks my_task --include_path ./tasks

lm-eval 0.4 finds models only in its own package (it reads no entry points and imports no plugins), so
the stock ``lm_eval --model dsft`` cannot see dsft's model; this entry point imports
:mod:`dsft.lmeval.model` (which registers it) and then hands the arguments to lm-eval unchanged.
From Python, ``import dsft.lmeval.model`` before ``lm_eval.simple_evaluate(model="dsft", ...)``.
"""
from __future__ import annotations

import sys


def main() -> None:
    from dsft.errors import UsageError
    from dsft.lmeval.run import import_lm_eval

    try:
        import_lm_eval()
    except UsageError as exc:  # the one-line hint naming the extra, not a traceback
        sys.exit(f"error: {exc}")
    from lm_eval.__main__ import cli_evaluate

    import dsft.lmeval.model  # noqa: F401  (registers the dsft model)

    cli_evaluate()


if __name__ == "__main__":
    main()
