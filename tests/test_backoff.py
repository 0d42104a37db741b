from twisted.trial.unittest import TestCase

from cockpit.backoff import doubling


class DoublingTests(TestCase):
    def test_the_first_failure_waits_the_start_and_each_next_one_twice_as_long_up_to_the_cap(self):
        self.assertEqual([1, 2, 4, 8, 16, 30, 30], [doubling(1.0, n, 30.0) for n in range(1, 8)])
        self.assertEqual([5, 10, 20, 40], [doubling(5.0, n, 600.0) for n in range(1, 5)])

    def test_no_failure_yet_waits_the_start(self):
        self.assertEqual(1.0, doubling(1.0, 0, 30.0))

    def test_a_thousand_failures_and_more_wait_the_cap_instead_of_overflowing(self):
        # 5.0 * 2 ** 1024 raises OverflowError: that many retries of a mail relay, or of the Bot API
        for failures in (1024, 1025, 1026, 10**6, 10**18):
            self.assertEqual(600.0, doubling(5.0, failures, 600.0))
        self.assertEqual(0.0, doubling(0.0, 10**6, 30.0))
