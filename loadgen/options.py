"""The command line of the load generator, and the checks between its options."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from client import DEFAULT_HOST, DEFAULT_PORT, non_negative_int
from loadgen.plan import CARRIER_TOKENS, PAYMENT_TOKENS, PRODUCTS, SCARCE_SKU, parse_mix

CLOSED_LOOP_CONCURRENCY = 100
OPEN_LOOP_CONCURRENCY = 1000  # only a safety cap: the rate decides how many are in flight
SPAWN_ONLY = ("base", "step_timeout", "payment_latency", "synchronous", "warm_sagas")

EPILOG = (
    "payment tokens for --mix:\n"
    + "".join(f"  {token:<20} {outcome}\n" for token, outcome in PAYMENT_TOKENS.items())
    + "  (any other token is declined)\n\n"
    "carrier tokens for --carrier-mix (orders placed with shipping, --ship-share):\n"
    + "".join(f"  {token:<20} {outcome}\n" for token, outcome in CARRIER_TOKENS.items())
    + "  e.g. --ship-share 0.5 --carrier-mix ship_standard=90,ship_refused=5,ship_timeout=3,"
    "ship_error=2\n\n"
    "With --cancel-share F that share of the orders gets a cancel_order at a random moment\n"
    "within --cancel-within seconds of its placement, racing its steps: the report counts the\n"
    "orders cancelled by their customer and how the cancels were answered (cancelled, too_late\n"
    "when the order shipped, failed or was paid without shipping first).\n\n"
    "Without --host, --port or --targets a private run.py is started on a fresh database in a\n"
    "temporary directory and stopped at the end. Against a target server the run raises the\n"
    "stock of the products it orders (and sets SKU-SCARCE with --scarce); it says so on\n"
    "stderr before it starts.\n\n"
    "exit status: 0 audit ok and every order terminal; 1 otherwise; 2 bad arguments (or --plot\n"
    "without matplotlib); 3 the server cannot be spawned or reached"
)


class UsageError(Exception):
    """A bad command line; main() turns it into exit status 2."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False:
            return text
        if default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _number(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a {'positive number' if positive else 'number >= 0'}"
        )
    return value


def _positive_float(text: str) -> float:
    return _number(text, positive=True)


def _non_negative_float(text: str) -> float:
    return _number(text, positive=False)


def _mix_arg(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _targets_arg(text: str) -> list[tuple[str, int]]:
    targets = [_address(item) for item in text.split(",") if item.strip()]
    if not targets:
        raise argparse.ArgumentTypeError("--targets needs at least one HOST:PORT")
    return targets


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring of loadgen)."""
    p = argparse.ArgumentParser(
        prog="loadtest.py",
        description="Drive orders through the gateway; report throughput, latency and the audit.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--orders", type=_positive_int, default=1000, help="orders to place")
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help=f"orders in flight at once (default: {CLOSED_LOOP_CONCURRENCY}); with --rate a "
        f"safety cap on them (default: {OPEN_LOOP_CONCURRENCY})",
    )
    p.add_argument(
        "--rate",
        type=_non_negative_float,
        default=0.0,
        help="open loop: orders/s offered, Poisson arrivals, latency from the intended start "
        "(0: closed loop)",
    )
    p.add_argument(
        "--connections", type=_positive_int, default=4, help="pipelined client connections"
    )
    target = p.add_argument_group("target server (any of these: no private run.py)")
    target.add_argument(
        "--host", default=None, help=f"gateway host (default: $ORDER_HOST or {DEFAULT_HOST})"
    )
    target.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"gateway port (default: $ORDER_PORT or {DEFAULT_PORT})",
    )
    target.add_argument(
        "--targets",
        type=_targets_arg,
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="gateways to spread the connections over: nodes of one shared store (an order "
        "whose node dies is followed on the others until it ends)",
    )
    spawn = p.add_argument_group("private run.py (the default)")
    spawn.add_argument(
        "--spawn", action="store_true", help="start a private run.py (the default anyway)"
    )
    spawn.add_argument(
        "--spawn-nodes",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="start a private PostgreSQL and N run.py nodes sharing it, spread the orders "
        "over them, stop everything at the end (0: one run.py on SQLite)",
    )
    spawn.add_argument(
        "--base",
        choices=("simple", "queue", "tcp"),
        default=None,
        help="run.py --base (default: simple)",
    )
    spawn.add_argument(
        "--step-timeout", type=_positive_float, default=None, help="run.py --step-timeout"
    )
    spawn.add_argument(
        "--payment-latency", type=_non_negative_float, default=None, help="run.py --payment-latency"
    )
    spawn.add_argument(
        "--synchronous", choices=("FULL", "NORMAL"), default=None, help="run.py --synchronous"
    )
    spawn.add_argument(
        "--warm-sagas",
        type=int,
        default=None,
        help="run.py --warm-sagas (process bases: saga processes forked ahead of need)",
    )
    mix = p.add_argument_group("the orders")
    mix.add_argument(
        "--mix",
        type=_mix_arg,
        default="tok_visa=1",
        help="payment token weights, e.g. tok_visa=90,tok_chargeDeclined=5,tok_timeout=5 "
        "(tokens below)",
    )
    mix.add_argument(
        "--ship-share",
        type=float,
        default=0.0,
        help="share of the orders placed with shipping (they end shipped, cancelled or failed)",
    )
    mix.add_argument(
        "--carrier-mix",
        type=_mix_arg,
        default="ship_standard=1",
        help="carrier token weights for the orders placed with shipping, e.g. "
        "ship_standard=90,ship_refused=5,ship_timeout=3,ship_error=2 (tokens below)",
    )
    mix.add_argument(
        "--cancel-share",
        type=float,
        default=0.0,
        help="share of the orders the customer cancels (cancel_order) shortly after placing",
    )
    mix.add_argument(
        "--cancel-within",
        type=_non_negative_float,
        default=0.05,
        help="seconds after its placement within which an order's cancel is sent (uniform)",
    )
    mix.add_argument(
        "--scarce",
        type=non_negative_int,
        default=0,
        help=f"units of {SCARCE_SKU} that a share of the orders race for (0: off)",
    )
    mix.add_argument(
        "--scarce-share",
        type=float,
        default=0.2,
        help=f"share of the orders asking for 1 unit of {SCARCE_SKU}",
    )
    mix.add_argument(
        "--lines", type=_positive_int, default=1, help=f"lines per order (1..{len(PRODUCTS)})"
    )
    mix.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument(
        "--order-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds to wait for one order's reply before counting it as not terminal",
    )
    p.add_argument(
        "--admin-token",
        default=os.environ.get("ORDER_ADMIN_TOKEN"),
        help="token for set_stock if the server requires one (default: $ORDER_ADMIN_TOKEN)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="write the summary as JSON")
    p.add_argument(
        "--plot", metavar="PATH.png", default=None, help="write a chart (needs matplotlib)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return p


def spread(connections: int, targets: int) -> int:
    """Connections for `targets` gateways: at least one each, and as many on each (the orders
    go round the connections, so an uneven split would load one node more than the others)."""
    return -(-connections // targets) * targets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the options; raises UsageError (or SystemExit for --help).

    Sets `targets` (empty: spawn a private run.py, or `spawn_nodes` of them on PostgreSQL) and
    `concurrency` for the chosen mode.
    """
    args = build_parser().parse_args(argv)
    named = args.host is not None or args.port is not None
    if named and args.targets:
        raise UsageError("give either --host/--port or --targets")
    if args.targets:
        targets = list(args.targets)
    elif named:
        host = args.host or os.environ.get("ORDER_HOST", DEFAULT_HOST)
        port = (
            args.port if args.port is not None else int(os.environ.get("ORDER_PORT", DEFAULT_PORT))
        )
        targets = [(host, port)]
    else:
        targets = []
    if targets and (args.spawn or args.spawn_nodes):
        raise UsageError(
            "--host/--port/--targets name an existing server; --spawn/--spawn-nodes start their own"
        )
    if targets:
        given = [f"--{n.replace('_', '-')}" for n in SPAWN_ONLY if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to a private run.py (no target)")
    else:
        args.base = args.base or "simple"
    args.targets = targets
    if args.spawn and args.spawn_nodes:
        raise UsageError(
            "--spawn starts one run.py on SQLite; --spawn-nodes N starts N on PostgreSQL"
        )
    args.spawn = not targets and not args.spawn_nodes
    if args.concurrency is None:
        args.concurrency = OPEN_LOOP_CONCURRENCY if args.rate > 0 else CLOSED_LOOP_CONCURRENCY
    args.connections = spread(args.connections, len(targets) or args.spawn_nodes or 1)
    if args.lines > len(PRODUCTS):
        raise UsageError(f"--lines must be 1..{len(PRODUCTS)}")
    _check_shares(args)
    return args


def _check_shares(args: argparse.Namespace) -> None:
    for name in ("scarce_share", "ship_share", "cancel_share"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1")
    carriers = [t for t in args.mix if t in CARRIER_TOKENS]
    if carriers:
        raise UsageError(
            f"{', '.join(carriers)} in --mix: carrier tokens go in --carrier-mix "
            "(with --ship-share), --mix is the payment tokens'"
        )
    payments = [t for t in args.carrier_mix if t in PAYMENT_TOKENS]
    if payments:
        raise UsageError(f"{', '.join(payments)} in --carrier-mix: payment tokens go in --mix")
