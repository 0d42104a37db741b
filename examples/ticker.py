"""A generic event every `every` seconds: [[servers]] service = "ticker:Ticker"."""
from twisted.internet import task
from twisted.logger import Logger

log = Logger()


class Ticker:
    def __init__(self, context):
        self.context = context
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = context.reactor  # the cockpit's clock: a test drives it

    def tick(self):
        # an event the bus cannot take now is logged, and the next tick tries again
        self.context.publish("generic", {"tags": ["tick"]}).addErrback(lambda f: log.warn("tick: {error}", error=f.value))

    def start(self):
        self.loop.start(float(self.context.settings.get("every", 1)), now=False).addErrback(self.context.failed)

    def stop(self):
        self.loop.stop()
