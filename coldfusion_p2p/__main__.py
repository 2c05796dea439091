"""``python -m coldfusion_p2p`` is ``coldfusion-peer``."""

import sys

from coldfusion_p2p.cli import main

sys.exit(main())
