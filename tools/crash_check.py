#!/usr/bin/env python3
"""Independent checker for settlement's results in a Cassandra/Scylla keyspace.

It shares no code with the Rust crate: it recomputes what settlement must have stored from the
INPUT file alone (following the interface contract in docs/architecture.md), reads the store through
the CQL native protocol itself (the standard-library client in tools/cassandra-node/cql_probe.py,
plus paging, which the probe lacks), and compares.

Usage:
  tools/crash_check.py --input FILE --store 'cql://127.0.0.1:9042/KEYSPACE?consistency=one'
                       [--rejects FILE] [--json-out FILE] [--page-size N] [--timeout S] [-q]

Exit 0 when every check passed, 1 when some check failed (a readable report on stdout),
2 when the store cannot be read or the arguments are wrong.

The model (contract, independently written):
  * a line longer than 4096 bytes, not JSON, not an object, or without an output_sequence in
    0..=i64::MAX is rejected and does not move the sequence (ids and sequences must fit
    Cassandra's bigint);
  * dedup by what was seen (P9 in docs/architecture.md): an output_sequence seen before (settled
    or rejected) is a duplicate: skipped; any other one is handled, also one below the highest
    (it fills an open hole) or below the first; one more than 1,000,000 (settlement's default
    --max-seq-jump) away from the range seen so far is rejected and counts as not seen;
  * the message is validated: a trade needs trade_id,
    symbol BASE-QUOTE (1-16 of A-Z0-9 each, BASE != QUOTE), buyer/seller ids, price and
    quantity > 0 with price*quantity in i64, timestamp_ns >= 0; a movement (type deposit or
    withdraw) needs user_id, asset, amount > 0. Invalid messages are rejected;
  * deposit: balance += amount; withdraw: applied only when balance >= amount, else refused;
    trade: buyer base += q, buyer quote -= p*q, seller base -= q, seller quote += p*q
    (never refused for funds); any balance leaving i64 refuses the event; a trade whose trade_id
    was settled before (under another sequence) is refused.

Checks (each counts as one invariant check, with how many items it covered):
  trades_present, trades_fields, trades_unexpected, movements_present, movements_fields,
  movements_unexpected, sequence_once (no output_sequence stored twice), lsn_order (LSNs distinct
  and increasing in the order the events were first accepted, which is output_sequence order
  except for hole fills), balances_equal (every row equals the recomputation;
  absent rows are 0), balances_unexpected (no row the model never touched),
  balance_last_lsn (each row's last_lsn is the LSN of the last stored event touching it),
  conservation (per asset: sum of stored balances = stored deposits - stored withdrawals =
  the recomputed deposits - withdrawals), and with --rejects: rejects_logged (every rejected
  or refused message with a sequence is in the rejects file, no settled one is).
"""

import argparse
import json
import os
import struct
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(HERE, "cassandra-node"))
import cql_probe  # noqa: E402  (standard-library CQL client of the test node)

I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
MAX_MESSAGE_BYTES = 4096
MAX_ASSET_LEN = 16
MAX_LISTED = 20


# --------------------------------------------------------------------------------------------
# The model: what settlement must have stored, from the input alone.
# --------------------------------------------------------------------------------------------

def _is_uint(v):
    """An id or sequence: a non-negative integer that fits a signed 64-bit (Cassandra bigint)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= I64_MAX


def _positive_i64(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= I64_MAX


def _asset_ok(s):
    return (isinstance(s, str) and 1 <= len(s) <= MAX_ASSET_LEN
            and all(c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" for c in s))


class Model:
    def __init__(self):
        self.balances = {}        # (user, asset) -> amount
        self.touched_by = {}      # (user, asset) -> output_sequence of the last event touching it
        self.trades = {}          # trade_id -> dict of the expected row
        self.movements = {}       # output_sequence -> dict of the expected row
        self.accepted_seqs = []   # settled output sequences, in input order
        self.rejected_with_seq = set()
        self.rejected_without_seq = 0
        self.rejected_wild = 0    # wild sequences: refused, written to the rejects file
        self.duplicates = 0
        self.deposits = {}        # asset -> sum
        self.withdrawals = {}     # asset -> sum
        self.lines = 0


def _validate(obj, seq):
    """The event as a dict, or None when invalid (rejected)."""
    kind = obj.get("type", None)
    if "type" not in obj:
        sym = obj.get("symbol")
        if not _is_uint(obj.get("trade_id")) or not isinstance(sym, str) or "-" not in sym:
            return None
        base, quote = sym.split("-", 1)
        if not _asset_ok(base) or not _asset_ok(quote) or base == quote:
            return None
        b, s = obj.get("buyer_user_id"), obj.get("seller_user_id")
        p, q = obj.get("price"), obj.get("quantity")
        ts = obj.get("timestamp_ns")
        if not (_is_uint(b) and _is_uint(s) and _positive_i64(p) and _positive_i64(q)):
            return None
        if p * q > I64_MAX:
            return None
        if not (isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts <= I64_MAX):
            return None
        return {"kind": "trade", "output_sequence": seq, "trade_id": obj["trade_id"],
                "symbol": sym, "base": base, "quote": quote, "buyer_user_id": b,
                "seller_user_id": s, "price": p, "quantity": q, "timestamp_ns": ts}
    if kind not in ("deposit", "withdraw"):
        return None
    u, a, amt = obj.get("user_id"), obj.get("asset"), obj.get("amount")
    if not (_is_uint(u) and _asset_ok(a) and _positive_i64(amt)):
        return None
    return {"kind": kind, "output_sequence": seq, "user_id": u, "asset": a, "amount": amt}


MAX_SEQ_JUMP = 1_000_000


def build_model(path):
    m = Model()
    seen = set()
    first_seq = high_seq = None
    with open(path, "rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue  # blank lines are not messages
            m.lines += 1
            if len(line) > MAX_MESSAGE_BYTES:
                m.rejected_without_seq += 1
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                m.rejected_without_seq += 1
                continue
            if not isinstance(obj, dict) or not _is_uint(obj.get("output_sequence")):
                m.rejected_without_seq += 1
                continue
            seq = obj["output_sequence"]
            if seq in seen:
                m.duplicates += 1
                continue
            if high_seq is not None and (seq > high_seq + MAX_SEQ_JUMP or seq + MAX_SEQ_JUMP < first_seq):
                m.rejected_wild += 1  # a wild sequence: refused, not taken as seen
                continue
            seen.add(seq)
            first_seq = seq if first_seq is None else min(first_seq, seq)
            high_seq = seq if high_seq is None else max(high_seq, seq)
            ev = _validate(obj, seq)
            if ev is None:
                m.rejected_with_seq.add(seq)
                continue
            if ev["kind"] == "trade":
                n = ev["price"] * ev["quantity"]
                deltas = {}
                for key, d in (((ev["buyer_user_id"], ev["base"]), ev["quantity"]),
                               ((ev["buyer_user_id"], ev["quote"]), -n),
                               ((ev["seller_user_id"], ev["base"]), -ev["quantity"]),
                               ((ev["seller_user_id"], ev["quote"]), n)):
                    deltas[key] = deltas.get(key, 0) + d
            else:
                d = ev["amount"] if ev["kind"] == "deposit" else -ev["amount"]
                deltas = {(ev["user_id"], ev["asset"]): d}
            after = {k: m.balances.get(k, 0) + d for k, d in deltas.items()}
            if any(not (I64_MIN <= v <= I64_MAX) for v in after.values()):
                m.rejected_with_seq.add(seq)
                continue
            if ev["kind"] == "trade" and ev["trade_id"] in m.trades:
                m.rejected_with_seq.add(seq)  # a reused trade id
                continue
            if ev["kind"] == "withdraw" and m.balances.get((ev["user_id"], ev["asset"]), 0) < ev["amount"]:
                m.rejected_with_seq.add(seq)  # refused: above the balance
                continue
            m.balances.update(after)
            for k in after:
                m.touched_by[k] = seq
            m.accepted_seqs.append(seq)
            if ev["kind"] == "trade":
                m.trades[ev["trade_id"]] = ev
            else:
                m.movements[seq] = ev
                tot = m.deposits if ev["kind"] == "deposit" else m.withdrawals
                tot[ev["asset"]] = tot.get(ev["asset"], 0) + ev["amount"]
    return m


# --------------------------------------------------------------------------------------------
# Reading the store: CQL native protocol v4 with paging.
# --------------------------------------------------------------------------------------------

class Store:
    def __init__(self, host, port, timeout, page_size, consistency="ONE"):
        self.host, self.port, self.timeout = host, port, timeout
        self.page_size, self.consistency = page_size, consistency
        self.conn = None

    def connect(self, attempts=10):
        err = None
        for i in range(attempts):
            try:
                self.conn = cql_probe.Connection(self.host, self.port, self.timeout)
                self.conn.startup()
                return
            except (cql_probe.ProbeError, cql_probe.ServerError) as e:
                err = e
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                time.sleep(min(2.0, 0.2 * (i + 1)))
        raise cql_probe.ProbeError("cannot connect to %s:%d: %s" % (self.host, self.port, err))

    def close(self):
        if self.conn is not None:
            self.conn.close()

    def select_all(self, cql):
        """Every row of `cql` as a list of dicts, following paging states."""
        out = []
        state = None
        names = None
        while True:
            flags = 0x04 | (0x08 if state is not None else 0)
            body = (cql_probe.encode_long_string(cql)
                    + struct.pack(">HB", cql_probe.CONSISTENCY[self.consistency], flags)
                    + struct.pack(">i", self.page_size))
            if state is not None:
                body += struct.pack(">i", len(state)) + state
            op, r = self._request(body)
            if op != cql_probe.OP_RESULT or r.int() != 0x0002:
                raise cql_probe.ProbeError("SELECT did not return rows: %s" % cql)
            page_names, rows, state = self._rows(r)
            names = names or page_names
            out.extend(dict(zip(page_names, row)) for row in rows)
            if state is None:
                return out

    def _request(self, body):
        last = None
        for attempt in range(5):
            try:
                if self.conn is None:
                    self.connect()
                return self.conn.request(cql_probe.OP_QUERY, body)
            except cql_probe.ServerError as e:
                # read timeouts / unavailable right after a node restart: retry the same page
                if e.code not in (0x1000, 0x1001, 0x1200, 0x1300):
                    raise
                last = e
            except cql_probe.ProbeError as e:
                last = e
                self.close()
                self.conn = None
            time.sleep(0.5 * (attempt + 1))
        raise cql_probe.ProbeError("query failed after retries: %s" % last)

    @staticmethod
    def _rows(r):
        flags = r.int()
        ncols = r.int()
        state = r.bytes_() if flags & 0x0002 else None
        if flags & 0x0004:
            raise cql_probe.ProbeError("rows without metadata")
        global_spec = bool(flags & 0x0001)
        if global_spec:
            r.string()
            r.string()
        cols = []
        for _ in range(ncols):
            if not global_spec:
                r.string()
                r.string()
            name = r.string()
            cols.append((name, r.option()))
        rows = []
        for _ in range(r.int()):
            rows.append([cql_probe.decode_value(t, r.bytes_()) for _, t in cols])
        return [c[0] for c in cols], rows, state


def parse_store_url(url):
    """cql://HOST:PORT[,HOST:PORT]/KEYSPACE[?...] -> (host, port, keyspace)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "cql":
        raise ValueError("only cql:// stores can be checked: %r" % url)
    first = u.netloc.split(",")[0]
    host, _, port = first.rpartition(":")
    if not host:
        host, port = first, "9042"
    ks = u.path.strip("/")
    if not ks or not all(c.isalnum() or c == "_" for c in ks):
        raise ValueError("bad keyspace in %r" % url)
    return host, int(port), ks


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

class Check:
    def __init__(self, name, what):
        self.name, self.what = name, what
        self.items = 0
        self.failures = 0
        self.examples = []

    def item(self, ok, text=None):
        self.items += 1
        if not ok:
            self.fail(text)

    def fail(self, text):
        self.failures += 1
        if len(self.examples) < MAX_LISTED:
            self.examples.append(text)

    @property
    def passed(self):
        return self.failures == 0


def run_checks(model, trades, movements, balances, rejects_path=None):
    checks = []

    def new(name, what):
        c = Check(name, what)
        checks.append(c)
        return c

    # --- trades
    by_id = {}
    for t in trades:
        by_id.setdefault(t["trade_id"], []).append(t)
    c = new("trades_present", "every accepted trade has its row")
    for tid in model.trades:
        c.item(tid in by_id, "trade %d (output_sequence %d) is missing"
               % (tid, model.trades[tid]["output_sequence"]))
    c = new("trades_fields", "each trade row holds the input's values")
    for tid, want in model.trades.items():
        for got in by_id.get(tid, []):
            diffs = [k for k in ("output_sequence", "symbol", "buyer_user_id", "seller_user_id",
                                 "price", "quantity", "timestamp_ns") if got.get(k) != want[k]]
            c.item(not diffs, "trade %d: %s" % (tid, ", ".join(
                "%s stored %r, input %r" % (k, got.get(k), want[k]) for k in diffs)))
    c = new("trades_unexpected", "no trade row that the input does not settle")
    for tid, rows in by_id.items():
        c.item(tid in model.trades, "trade %d (output_sequence %r) should not exist"
               % (tid, rows[0].get("output_sequence")))

    # --- movements
    mov_by_seq = {mv["output_sequence"]: mv for mv in movements}
    c = new("movements_present", "every accepted deposit/withdrawal has its row")
    for seq, want in model.movements.items():
        c.item(seq in mov_by_seq, "%s of %d %s by user %d (output_sequence %d) is missing"
               % (want["kind"], want["amount"], want["asset"], want["user_id"], seq))
    c = new("movements_fields", "each movement row holds the input's values")
    for seq, want in model.movements.items():
        got = mov_by_seq.get(seq)
        if got is None:
            continue
        diffs = [k for k in ("kind", "user_id", "asset", "amount") if got.get(k) != want[k]]
        c.item(not diffs, "movement %d: %s" % (seq, ", ".join(
            "%s stored %r, input %r" % (k, got.get(k), want[k]) for k in diffs)))
    c = new("movements_unexpected", "no movement row the input does not settle (refused withdrawals)")
    for seq in mov_by_seq:
        c.item(seq in model.movements, "movement output_sequence %d should not exist%s"
               % (seq, " (it was refused or rejected)" if seq in model.rejected_with_seq else ""))

    # --- sequences and LSNs
    c = new("sequence_once", "no output_sequence stored twice (trades and movements together)")
    seen = {}
    for t in trades:
        seen.setdefault(t["output_sequence"], []).append("trade %d" % t["trade_id"])
    for mv in movements:
        seen.setdefault(mv["output_sequence"], []).append("movement")
    for seq, who in seen.items():
        c.item(len(who) == 1, "output_sequence %d stored %d times: %s" % (seq, len(who), ", ".join(who)))
    c = new("lsn_order", "event LSNs are distinct and increase in the order events were accepted")
    order = {s: i for i, s in enumerate(model.accepted_seqs)}
    events = sorted([(t["output_sequence"], t["lsn"]) for t in trades]
                    + [(mv["output_sequence"], mv["lsn"]) for mv in movements],
                    key=lambda e: (order.get(e[0], len(order)), e[0]))
    lsns = [l for _, l in events]
    if len(set(lsns)) != len(lsns):
        c.fail("%d LSNs are shared by more than one event row" % (len(lsns) - len(set(lsns))))
    for (s0, l0), (s1, l1) in zip(events, events[1:]):
        c.item(l1 is not None and l0 is not None and l1 > l0,
               "output_sequence %d has LSN %r but the earlier %d has LSN %r" % (s1, l1, s0, l0))

    # --- balances
    stored = {(b["user_id"], b["asset"]): b for b in balances}
    c = new("balances_equal", "every balance equals its recomputation from the input")
    for key in set(model.balances) | set(stored):
        want = model.balances.get(key, 0)
        row = stored.get(key)
        got = row["amount"] if row is not None else 0
        c.item(got == want, "user %d %s: stored %s, recomputed %d (difference %+d)"
               % (key[0], key[1], "no row" if row is None else got, want, got - want))
    c = new("balances_unexpected", "no balance row for a (user, asset) no settled event touched")
    for key in stored:
        c.item(key in model.touched_by, "user %d %s has a row (amount %r) but no settled event touches it"
               % (key[0], key[1], stored[key]["amount"]))
    c = new("balance_last_lsn", "each balance row's last_lsn is the LSN of the last stored event touching it")
    lsn_of_seq = {s: l for s, l in events}
    for key, row in stored.items():
        seq = model.touched_by.get(key)
        if seq is None or seq not in lsn_of_seq:
            continue  # reported by balances_unexpected / *_present
        c.item(row["last_lsn"] == lsn_of_seq[seq],
               "user %d %s: last_lsn %r, but its last event (output_sequence %d) has LSN %r"
               % (key[0], key[1], row["last_lsn"], seq, lsn_of_seq[seq]))

    c = new("conservation", "per asset: sum(balances) = deposits - withdrawals (stored and recomputed)")
    assets = set(model.deposits) | set(model.withdrawals) | {k[1] for k in stored} | {mv["asset"] for mv in movements}
    for a in sorted(assets):
        bal = sum(r["amount"] for k, r in stored.items() if k[1] == a)
        dep = sum(mv["amount"] for mv in movements if mv["asset"] == a and mv["kind"] == "deposit")
        wd = sum(mv["amount"] for mv in movements if mv["asset"] == a and mv["kind"] == "withdraw")
        want = model.deposits.get(a, 0) - model.withdrawals.get(a, 0)
        c.item(bal == dep - wd == want,
               "%s: sum(balances) %d, stored deposits - withdrawals %d - %d = %d, recomputed %d"
               % (a, bal, dep, wd, dep - wd, want))

    if rejects_path is not None:
        c = new("rejects_logged", "every rejected/refused message is in the rejects file; no settled one is")
        logged = set()
        logged_null = 0
        try:
            with open(rejects_path, "rb") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        c.fail("rejects file line is not JSON: %r" % line[:120])
                        continue
                    if r.get("output_sequence") is None:
                        logged_null += 1
                    else:
                        logged.add(r["output_sequence"])
                    if not r.get("reason"):
                        c.fail("rejects file line without a reason: %r" % line[:120])
        except OSError as e:
            c.fail("cannot read %s: %s" % (rejects_path, e))
        for seq in sorted(model.rejected_with_seq):
            c.item(seq in logged, "rejected output_sequence %d is not in the rejects file" % seq)
        accepted = set(model.accepted_seqs)
        for seq in sorted(logged & accepted):
            c.fail("output_sequence %d is in the rejects file but was settled" % seq)
        c.item(logged_null >= model.rejected_without_seq,
               "%d messages without a readable sequence must be rejected, the file has %d"
               % (model.rejected_without_seq, logged_null))
    return checks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="the JSON-lines input settlement ran over")
    ap.add_argument("--store", required=True, help="cql://HOST:PORT/KEYSPACE[?...]")
    ap.add_argument("--rejects", help="settlement's rejects file (adds the rejects_logged check)")
    ap.add_argument("--json-out", help="write the result as JSON here")
    ap.add_argument("--page-size", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("-q", "--quiet", action="store_true", help="only the verdict and failures")
    args = ap.parse_args()

    try:
        host, port, ks = parse_store_url(args.store)
    except ValueError as e:
        print("crash_check: %s" % e, file=sys.stderr)
        return 2
    t0 = time.time()
    model = build_model(args.input)
    store = Store(host, port, args.timeout, args.page_size)
    try:
        store.connect()
        trades = store.select_all(
            "SELECT trade_id, output_sequence, symbol, buyer_user_id, seller_user_id, price, "
            "quantity, timestamp_ns, lsn FROM %s.trades" % ks)
        movements = store.select_all(
            "SELECT output_sequence, kind, user_id, asset, amount, lsn FROM %s.movements" % ks)
        balances = store.select_all("SELECT user_id, asset, amount, last_lsn FROM %s.balances" % ks)
    except (cql_probe.ProbeError, cql_probe.ServerError) as e:
        print("crash_check: reading %s:%d keyspace %s failed: %s" % (host, port, ks, e), file=sys.stderr)
        return 2
    finally:
        store.close()
    checks = run_checks(model, trades, movements, balances, args.rejects)
    passed = sum(1 for c in checks if c.passed)
    failed = len(checks) - passed
    secs = time.time() - t0

    if not args.quiet:
        print("crash_check: input %s: %d messages, %d trades and %d movements settled, "
              "%d rejected/refused (%d without a sequence), %d duplicates"
              % (args.input, model.lines, len(model.trades), len(model.movements),
                 len(model.rejected_with_seq) + model.rejected_without_seq,
                 model.rejected_without_seq, model.duplicates))
        print("crash_check: store %s:%d/%s: %d trade rows, %d movement rows, %d balance rows (read in pages of %d)"
              % (host, port, ks, len(trades), len(movements), len(balances), args.page_size))
    for c in checks:
        if args.quiet and c.passed:
            continue
        print("  %-20s %-4s %8d items  %s" % (c.name, "ok" if c.passed else "FAIL", c.items, c.what))
        for e in c.examples:
            print("      - %s" % e)
        if c.failures > len(c.examples):
            print("      ... and %d more" % (c.failures - len(c.examples)))
    print("crash_check: %s: %d of %d checks passed (%d items verified, %.1f s)"
          % ("PASSED" if failed == 0 else "FAILED", passed, len(checks),
             sum(c.items for c in checks), secs))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({
                "passed": failed == 0, "checks_passed": passed, "checks_failed": failed,
                "items": sum(c.items for c in checks),
                "checks": [{"name": c.name, "passed": c.passed, "items": c.items,
                            "failures": c.failures, "examples": c.examples} for c in checks],
                "model": {"messages": model.lines, "trades": len(model.trades),
                          "movements": len(model.movements),
                          "rejected": len(model.rejected_with_seq) + model.rejected_without_seq,
                          "duplicates": model.duplicates},
                "store": {"trades": len(trades), "movements": len(movements), "balances": len(balances)},
            }, f, indent=1)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
