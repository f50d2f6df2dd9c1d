"""A consumer process for the tests: Django set up against the test database, a handler,
and one of the kit's consumers, stopped by SIGTERM (or killed by the test).

    python consumer_app.py --db-port P --broker redis --url redis://... --source outbox.order \
        --group shipping --name worker-1 [--mode ship|slow|poison] [--max-attempts N]
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-port", type=int, required=True)
    parser.add_argument("--broker", choices=["redis", "kafka"], required=True)
    parser.add_argument("--url", required=True, help="Redis URL, or Kafka bootstrap servers")
    parser.add_argument("--source", required=True, help="the stream or topic")
    parser.add_argument("--group", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mode", default="ship", choices=["ship", "slow", "poison"])
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--claim-idle-ms", type=int, default=60_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from shop.settings import configure

    configure(args.db_port)

    from outboxd.consume import DjangoStore, RetryPolicy
    from shop.models import Shipment
    from shop.services import ship

    def handler(event):
        if event.type == "order.poison" and args.mode == "poison":
            raise ValueError(f"cannot handle {event.id}")
        ship(event)
        # In the handler's transaction: which process made it, for the tests.
        Shipment.objects.filter(event_id=event.id).update(handled_by=args.name)
        if args.mode == "slow" and event.type == "order.paid":
            time.sleep(30)  # the tests kill the process here, inside the transaction

    store = DjangoStore(args.group)
    policy = RetryPolicy(max_attempts=args.max_attempts, backoff_initial=0.05, backoff_max=0.5)
    if args.broker == "redis":
        import redis

        from outboxd.consume import RedisStreamsConsumer

        consumer = RedisStreamsConsumer(
            redis.Redis.from_url(args.url), [args.source], args.group, args.name, handler, store,
            policy, claim_idle_ms=args.claim_idle_ms, block_ms=200,
        )
    else:
        from outboxd.consume import KafkaConsumer

        consumer = KafkaConsumer(
            {"bootstrap.servers": args.url, "client.id": args.name, "log_level": 3},
            [args.source], args.group, handler, store, policy, poll_timeout=0.2,
        )
    consumer.stop_on_signals()
    print("consumer running", flush=True)
    consumer.run()


if __name__ == "__main__":
    main()
