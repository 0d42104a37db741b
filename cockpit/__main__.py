"""``python -m cockpit``: the ``cockpit`` console script."""
from cockpit.cli import main

raise SystemExit(main())
