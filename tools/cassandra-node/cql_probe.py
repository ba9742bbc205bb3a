#!/usr/bin/env python3
"""Minimal CQL client (native protocol v4) for probing the local test node.

Standard library only: there is no cqlsh or Python driver on CI machines.

Usage:
  cql_probe.py [--host H] [--port P] [--timeout S]
      Default check: SELECT bootstrapped FROM system.local. Exit 0 when it says
      COMPLETED, 1 when it answers something else, 2 when the node can't be
      reached or the protocol exchange fails.

  cql_probe.py --query "CQL" [--query "CQL" ...] [--consistency ONE]
      Run each statement in order on one connection (so "USE ks" carries over)
      and print the result: rows as a tab-separated table with a header line,
      other results as a one-line summary. Exit 0 when every statement
      succeeded, 1 on the first server error (printed to stderr), 2 on a
      connection / protocol failure.

  -q/--quiet suppresses the progress output on stderr.
"""

import argparse
import datetime
import decimal
import ipaddress
import socket
import struct
import sys
import uuid

PROTOCOL_VERSION = 4

# Opcodes
OP_ERROR = 0x00
OP_STARTUP = 0x01
OP_READY = 0x02
OP_AUTHENTICATE = 0x03
OP_QUERY = 0x07
OP_RESULT = 0x08

# Response header flags
FLAG_COMPRESSION = 0x01
FLAG_TRACING = 0x02
FLAG_CUSTOM_PAYLOAD = 0x04
FLAG_WARNING = 0x08

CONSISTENCY = {
    "ANY": 0x0000, "ONE": 0x0001, "TWO": 0x0002, "THREE": 0x0003,
    "QUORUM": 0x0004, "ALL": 0x0005, "LOCAL_QUORUM": 0x0006,
    "EACH_QUORUM": 0x0007, "SERIAL": 0x0008, "LOCAL_SERIAL": 0x0009,
    "LOCAL_ONE": 0x000A,
}

ERROR_NAMES = {
    0x0000: "Server error", 0x000A: "Protocol error", 0x0100: "Bad credentials",
    0x1000: "Unavailable", 0x1001: "Overloaded", 0x1002: "Is bootstrapping",
    0x1003: "Truncate error", 0x1100: "Write timeout", 0x1200: "Read timeout",
    0x1300: "Read failure", 0x1400: "Function failure", 0x1500: "Write failure",
    0x2000: "Syntax error", 0x2100: "Unauthorized", 0x2200: "Invalid",
    0x2300: "Config error", 0x2400: "Already exists", 0x2500: "Unprepared",
}


class ProbeError(Exception):
    """Connection or protocol failure (exit code 2)."""


class ServerError(Exception):
    """The node answered with an ERROR frame (exit code 1)."""

    def __init__(self, code, message):
        super().__init__("%s (0x%04x): %s" % (ERROR_NAMES.get(code, "Error"), code, message))
        self.code = code


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise ProbeError("truncated frame body")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self):
        return self.take(1)[0]

    def short(self):
        return struct.unpack(">H", self.take(2))[0]

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def string(self):
        return self.take(self.short()).decode("utf-8", "replace")

    def long_string(self):
        return self.take(self.int()).decode("utf-8", "replace")

    def bytes_(self):
        n = self.int()
        return None if n < 0 else self.take(n)

    def string_list(self):
        return [self.string() for _ in range(self.short())]

    def bytes_map(self):
        return {self.string(): self.bytes_() for _ in range(self.short())}

    def option(self):
        type_id = self.short()
        if type_id == 0x0000:
            return ("custom", self.string())
        if type_id in (0x0020, 0x0022):
            return (type_id, self.option())
        if type_id == 0x0021:
            return (type_id, self.option(), self.option())
        if type_id == 0x0030:
            ks = self.string()
            name = self.string()
            fields = [(self.string(), self.option()) for _ in range(self.short())]
            return (type_id, ks, name, fields)
        if type_id == 0x0031:
            return (type_id, [self.option() for _ in range(self.short())])
        return (type_id,)


def encode_string(s):
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


def encode_long_string(s):
    b = s.encode("utf-8")
    return struct.pack(">i", len(b)) + b


def encode_string_map(m):
    out = struct.pack(">H", len(m))
    for k, v in m.items():
        out += encode_string(k) + encode_string(v)
    return out


def _varint(b):
    return int.from_bytes(b, "big", signed=True) if b else 0


def decode_value(typ, b):
    """Decode a CQL value into a printable Python object (best effort)."""
    if b is None:
        return None
    t = typ[0]
    try:
        if t in (0x0001, 0x000D):  # ascii, varchar/text
            return b.decode("utf-8", "replace")
        if t in (0x0002, 0x0005):  # bigint, counter
            return struct.unpack(">q", b)[0]
        if t == 0x0004:  # boolean
            return b != b"\x00"
        if t == 0x0006:  # decimal
            scale = struct.unpack(">i", b[:4])[0]
            return decimal.Decimal(_varint(b[4:])).scaleb(-scale)
        if t == 0x0007:
            return struct.unpack(">d", b)[0]
        if t == 0x0008:
            return struct.unpack(">f", b)[0]
        if t == 0x0009:
            return struct.unpack(">i", b)[0]
        if t == 0x000B:  # timestamp: ms since epoch
            ms = struct.unpack(">q", b)[0]
            try:
                return (datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
                        + datetime.timedelta(milliseconds=ms)).isoformat()
            except OverflowError:
                return ms
        if t in (0x000C, 0x000F):  # uuid, timeuuid
            return str(uuid.UUID(bytes=b))
        if t == 0x000E:  # varint
            return _varint(b)
        if t == 0x0010:  # inet
            return str(ipaddress.ip_address(b))
        if t == 0x0011:  # date: days, 2^31 = epoch
            days = struct.unpack(">I", b)[0] - (1 << 31)
            try:
                return (datetime.date(1970, 1, 1) + datetime.timedelta(days=days)).isoformat()
            except OverflowError:
                return days
        if t == 0x0012:  # time: ns since midnight
            return struct.unpack(">q", b)[0]
        if t == 0x0013:
            return struct.unpack(">h", b)[0]
        if t == 0x0014:
            return struct.unpack(">b", b)[0]
        if t in (0x0020, 0x0022):  # list, set
            r = Reader(b)
            items = [decode_value(typ[1], r.bytes_()) for _ in range(r.int())]
            return items if t == 0x0020 else "{" + ", ".join(map(repr, items)) + "}"
        if t == 0x0021:  # map
            r = Reader(b)
            return {_hashable(decode_value(typ[1], r.bytes_())): decode_value(typ[2], r.bytes_())
                    for _ in range(r.int())}
        if t == 0x0030:  # UDT
            r, out = Reader(b), {}
            for name, ftype in typ[3]:
                if r.pos >= len(r.data):
                    break
                out[name] = decode_value(ftype, r.bytes_())
            return out
        if t == 0x0031:  # tuple
            r = Reader(b)
            return tuple(decode_value(et, r.bytes_()) for et in typ[1])
    except (struct.error, ValueError, ProbeError):
        pass
    return "0x" + b.hex()  # blob, duration, custom (e.g. vector), or undecodable


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


class Connection:
    def __init__(self, host, port, timeout):
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ProbeError("cannot connect to %s:%d: %s" % (host, port, e))
        self.sock.settimeout(timeout)
        self.stream = 0
        self.warnings = []

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                raise ProbeError("timed out after %ss waiting for the node" % self.timeout)
            except OSError as e:
                raise ProbeError("socket error: %s" % e)
            if not chunk:
                raise ProbeError("connection closed by the node")
            buf += chunk
        return buf

    def request(self, opcode, body):
        self.stream = (self.stream + 1) % 32768
        header = struct.pack(">BBhBi", PROTOCOL_VERSION, 0, self.stream, opcode, len(body))
        try:
            self.sock.sendall(header + body)
        except OSError as e:
            raise ProbeError("socket error: %s" % e)
        while True:
            version, flags, stream, op, length = struct.unpack(">BBhBi", self._recv_exact(9))
            body = self._recv_exact(length)
            if version & 0x7F != PROTOCOL_VERSION:
                # e.g. protocol error answered in a lower version
                r = Reader(body)
                if op == OP_ERROR:
                    code = r.int()
                    raise ProbeError("protocol v%d refused: %s" % (PROTOCOL_VERSION, r.string()))
                raise ProbeError("unexpected protocol version 0x%02x in response" % version)
            if stream != self.stream:
                continue  # event or stale response: ignore
            if flags & FLAG_COMPRESSION:
                raise ProbeError("compressed response, but no compression was negotiated")
            r = Reader(body)
            if flags & FLAG_TRACING:
                r.take(16)
            if flags & FLAG_CUSTOM_PAYLOAD:
                r.bytes_map()
            if flags & FLAG_WARNING:
                self.warnings.extend(r.string_list())
            if op == OP_ERROR:
                code = r.int()
                raise ServerError(code, r.string())
            return op, r

    def startup(self):
        op, _ = self.request(OP_STARTUP, encode_string_map({"CQL_VERSION": "3.0.0"}))
        if op == OP_AUTHENTICATE:
            raise ProbeError("the node requires authentication (this probe supports none)")
        if op != OP_READY:
            raise ProbeError("unexpected answer 0x%02x to STARTUP" % op)

    def query(self, cql, consistency="ONE"):
        """Returns (kind, payload): ("rows", (names, rows)), ("void", None),
        ("set_keyspace", ks), ("schema_change", description)."""
        body = encode_long_string(cql) + struct.pack(">HB", CONSISTENCY[consistency], 0)
        op, r = self.request(OP_QUERY, body)
        if op != OP_RESULT:
            raise ProbeError("unexpected answer 0x%02x to QUERY" % op)
        kind = r.int()
        if kind == 0x0001:
            return "void", None
        if kind == 0x0002:
            return "rows", self._rows(r)
        if kind == 0x0003:
            return "set_keyspace", r.string()
        if kind == 0x0005:
            change, target = r.string(), r.string()
            parts = [r.string()]  # keyspace
            if target != "KEYSPACE":
                parts.append(r.string())  # table / type / function / aggregate name
            return "schema_change", "%s %s %s" % (change, target, ".".join(parts))
        return "result_kind_%d" % kind, None

    @staticmethod
    def _rows(r):
        flags = r.int()
        ncols = r.int()
        if flags & 0x0002:  # has_more_pages
            r.bytes_()
        if flags & 0x0004:  # no_metadata
            raise ProbeError("rows without metadata")
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
            rows.append([decode_value(t, r.bytes_()) for _, t in cols])
        return [c[0] for c in cols], rows


def fmt(v):
    if v is None:
        return "null"
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9042)
    ap.add_argument("--timeout", type=float, default=10.0, help="socket timeout in seconds (default 10)")
    ap.add_argument("--query", "-e", action="append", metavar="CQL",
                    help="statement to run; repeatable; without it: bootstrapped check")
    ap.add_argument("--consistency", default="ONE", type=str.upper, choices=sorted(CONSISTENCY))
    ap.add_argument("--quiet", "-q", action="store_true")
    args = ap.parse_args()

    def info(msg):
        if not args.quiet:
            print("cql_probe: " + msg, file=sys.stderr)

    conn = None
    try:
        conn = Connection(args.host, args.port, args.timeout)
        conn.startup()
        if not args.query:
            kind, payload = conn.query("SELECT bootstrapped FROM system.local", "ONE")
            if kind != "rows" or not payload[1]:
                info("system.local returned no row")
                return 1
            state = payload[1][0][0]
            info("%s:%d system.local bootstrapped = %s" % (args.host, args.port, state))
            return 0 if state == "COMPLETED" else 1
        for cql in args.query:
            try:
                kind, payload = conn.query(cql, args.consistency)
            finally:
                for w in conn.warnings:
                    print("cql_probe: server warning: " + w, file=sys.stderr)
                conn.warnings = []
            if kind == "rows":
                names, rows = payload
                print("\t".join(names))
                for row in rows:
                    print("\t".join(fmt(v) for v in row))
                info("(%d row%s)" % (len(rows), "" if len(rows) == 1 else "s"))
            elif kind == "schema_change":
                print("schema change: " + payload)
            elif kind == "set_keyspace":
                print("keyspace: " + payload)
            else:
                print("ok")
        return 0
    except ServerError as e:
        print("cql_probe: " + str(e), file=sys.stderr)
        return 1
    except ProbeError as e:
        info(str(e))
        return 2
    finally:
        if conn is not None:
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
