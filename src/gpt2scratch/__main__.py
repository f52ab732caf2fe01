"""`python -m gpt2scratch ...` is the `gpt2scratch` command."""

from gpt2scratch.cli import main

raise SystemExit(main())
