"""`python -m lora_fx ...`: the `lora-fx` command line (lora_fx.cli)."""

import os
import sys

# `python -m` puts the current folder first on sys.path, where a stray onnxscript.py or torch.py would shadow the
# installed package; the command line adds it back, last, only to import the user's factory (lora_fx.cli).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from lora_fx.cli import main  # noqa: E402

sys.exit(main())
