"""``python -m qk_sniffer``: the ``sniff-qk`` command (see :mod:`qk_sniffer.cli`)."""

from .cli import main

raise SystemExit(main())
