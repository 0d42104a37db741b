import re

from setuptools import find_packages, setup

# read, not imported: importing cockpit here would need its requirements before they are installed
VERSION = re.search(r'^__version__ = "([^"]+)"', open("cockpit/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="cockpit",
    version=VERSION,
    description="Event hub for operations teams: mail, chat, alarms, error reports "
    "and webhooks become typed events on Redis that drive automation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["cockpit", "cockpit.*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["cockpit_plugin.py"],
                  "cockpit.dashboard": ["index.html", "app.js", "app.css"]},
    entry_points={"console_scripts": ["cockpit = cockpit.cli:main"]},
    install_requires=[
        "twisted[tls]>=24.3",
        # 1.6.x only: the bus drives txredisapi below its public API (the protocol's reply queue,
        # the factory's connection pool, HiredisProtocol, SubscriberFactory.startConnecting), which
        # another release may change without notice
        "txredisapi>=1.6,<1.7",
        "hiredis>=2.0",  # txredisapi parses replies in C with it, several times faster
        "klein>=23.5",
        "treq>=23.11",
        "pyyaml>=6",
        "markdownify>=1.0",  # 1.x: the converter hooks take parent_tags, which cockpit.mailhtml overrides
        "service-identity>=21.1",
        "pydantic>=2.6,<3",
        "swagger-ui-bundle>=1.1",
        # Sentry SDKs send brotli whenever their host has it; 1.2 bounds what one call inflates
        "brotli>=1.2",
        "prometheus_client>=0.17",  # GET /metrics; a registry per cockpit, not the global one
    ],
    extras_require={
        "test": [
            "openapi-spec-validator>=0.7",
            "schemathesis>=3.30",
            "hypothesis>=6.100",
            "sentry-sdk>=2",  # the real SDK, in the Sentry ingest tests
            # drives Debian's /usr/bin/chromium in the dashboard's browser tests; its own browser
            # download (playwright install) is never used
            "playwright>=1.40",
            "mypy>=1.10",  # configured in mypy.ini; CI keeps it at zero errors
            "mypy-zope>=1.0",
            "flask>=3",  # a real WSGI app, in the extension tests and examples/flask_hook.py
        ],
    },
)
