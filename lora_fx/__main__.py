"""`python -m lora_fx ...`: the `lora-fx` command line (lora_fx.cli)."""

import sys

from lora_fx.cli import main

sys.exit(main())
