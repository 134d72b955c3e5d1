"""First run with [broker] workers: the workers share one registry, and one token is
created and logged once, by worker 0 (README, docs/dashboard.md)."""

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from broker.registry import DeviceRegistry, MemoryStore, RegistrySettings
from broker.web.dashboard.firstrun import FirstRunToken
from tests.web.test_dashboard_firstrun import capture_urls


class WorkerProcess(MultiService):
    """What a worker's BrokerService offers its children here: ``worker`` = (index, port)."""

    def __init__(self, index):
        super().__init__()
        self.worker = (index, 8080)


class WorkersFirstRunTests(SynchronousTestCase):
    """FirstRunToken in two workers over one shared store, on a Clock."""

    def test_one_token_for_all_the_workers(self):
        """Two workers starting together on an empty shared registry create one write
        token and log its URL once (before, each created and logged its own)."""
        clock = Clock()
        store = MemoryStore()
        urls = capture_urls(self)
        registries, services = [], []
        for index in (0, 1):
            registry = DeviceRegistry(store, clock=clock,
                                      settings=RegistrySettings(reload_interval=0))
            parent = WorkerProcess(index)
            service = FirstRunToken(registry, lambda: defer.succeed("http://127.0.0.1:8080"),
                                    clock)
            service.setServiceParent(parent)
            parent.startService()
            self.addCleanup(parent.stopService)
            registries.append(registry)
            services.append(service)
        clock.advance(0)
        self.assertEqual(len(urls), 1)
        self.assertEqual(self.successResultOf(services[0].done), urls[0])
        self.assertIsNone(self.successResultOf(services[1].done))
        self.assertEqual([info.role for info in registries[0].tokens()], ["write"])
