"""``python -m grpo_cli ...`` (and ``torchrun -m grpo_cli train ...``): the ``grpo`` command."""

from grpo_cli.cli import main

if __name__ == "__main__":
    main()
