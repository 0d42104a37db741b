"""twistd plugin: ``twistd -n cockpit --config config.toml``.

Kept lazy on purpose: listing ``twistd --help`` must import nothing heavy.
"""
from twisted.application.service import ServiceMaker

cockpit = ServiceMaker(
    "Cockpit",
    "cockpit.tap",
    "Event hub: SMTP, Telegram, REST and webhooks in, typed events on Redis, AYS actions out.",
    "cockpit",
)
