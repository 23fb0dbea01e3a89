"""Property test over all three programs (issue #12): hypothesis draws hostile frames (macnat.fuzz's
builder: scapy layers with fuzzed fields, options, extension headers, truncations), each runs from the
same known state, and every invariant of macnat.fuzz holds for every one. A failing frame is shrunk
to a small one and printed as hex. `python -m macnat.fuzz` runs the same builder and checks on 10^6
frames per program (docs/benchmarks.md has its figures)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from macnat import constants, fuzz, netns
from macnat.harness import TC_ACT_REDIRECT, TC_ACT_SHOT, VM_PORT, Harness
from macnat.maps import ip_key, mac_bytes
from scapy.layers.inet6 import ICMPv6NDOptSrcLLAddr

EXAMPLES_PER_PROGRAM = 3000  # about 20 s each on the development machine: a minute in all


class HypothesisDraw:
    """macnat.fuzz.Draw through hypothesis, which then shrinks what it drew."""

    def __init__(self, data):
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))

    def raw(self, size: int) -> bytes:
        return self.data.draw(st.binary(min_size=size, max_size=size))


@pytest.fixture(scope="module")
def fuzzer():
    h = Harness(f"{netns.PREFIX}test-prop", fuzz.WIFI_MAC)
    yield fuzz.Fuzzer(h, fresh_every=1)
    h.close()


@pytest.mark.parametrize("program", constants.PROGRAMS)
@settings(max_examples=EXAMPLES_PER_PROGRAM, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_no_hostile_frame_breaks_an_invariant(fuzzer, program, data):
    draw = HypothesisDraw(data)
    fuzzer.onlink = draw.choice([True, False])
    case = fuzz.hostile_frame(draw, program)
    _, found = fuzzer.check(case)
    assert not found, f"{program} from port {case.port}: {found}; frame {case.frame.hex()}"


def test_the_checks_catch_what_they_must(fuzzer):
    """The invariants are not vacuous: a VM's MAC left in, a changed byte, a broken checksum, a table
    changed by a dropped frame and a forbidden binding are each reported."""
    case = fuzz.Case("uplink_egress", VM_PORT, bytes(fuzz.Ether(src=fuzz.VM_MAC, dst=fuzz.LAN_MAC)
                     / fuzz.IP(src=fuzz.VM_IP, dst=fuzz.LAN_IP) / fuzz.UDP(sport=68, dport=67) / fuzz.Raw(b"x" * 240)))
    tables = {name: {} for name in (*fuzz.TABLES, "learned")}
    check = lambda retval, out, after=tables: fuzz.violations(case, retval, out, tables, after, True, 0,
                                                              fuzzer.forbidden)
    sent = case.frame[:6] + bytes(mac_bytes(fuzz.WIFI_MAC)) + case.frame[12:]  # as macnat sends it
    assert check(TC_ACT_REDIRECT, sent) == []
    assert check(TC_ACT_REDIRECT, case.frame) == ["a VM's MAC sent to the LAN at [6]"]
    ttl = bytearray(sent)
    ttl[22] ^= 1
    assert "bytes changed that macnat must not change: [22]" in check(TC_ACT_REDIRECT, bytes(ttl))[0]
    flags = bytearray(sent)
    flags[14 + 20 + 8 + 10] ^= 0x80  # the BOOTP flag, without the checksum update
    assert check(TC_ACT_REDIRECT, bytes(flags)) == ["checksum over 34..282 broken"]
    learned = {**tables, "bindings": {bytes(ip_key("127.0.0.1")): b""}}
    assert check(TC_ACT_SHOT, case.frame, learned) == ["tables changed by a dropped frame: ['bindings']",
                                                       "a binding for 127.0.0.1"]
    assert check(7, sent[:-1]) == [f"length {len(case.frame)} -> {len(case.frame) - 1}"]
    ns = fuzz.Case("uplink_egress", VM_PORT, bytes(
        fuzz.Ether(src=fuzz.VM_MAC, dst="33:33:ff:00:00:20") / fuzz.IPv6(src=fuzz.VM_IP6, dst="ff02::1:ff00:20")
        / fuzz.ICMPv6ND_NS(tgt=fuzz.LAN_IP6) / ICMPv6NDOptSrcLLAddr(lladdr=fuzz.VM_MAC)))
    untranslated = bytes(mac_bytes(fuzz.WIFI_MAC)).join([ns.frame[:6], ns.frame[12:]])  # source done, option not
    assert fuzz.violations(ns, TC_ACT_REDIRECT, untranslated, tables, tables, True, 0, fuzzer.forbidden) == \
        [f"a VM's MAC sent to the LAN at [{14 + 40 + 24 + 2}]"]


def test_the_fuzz_figures_stay_in_benchmarks_md(tmp_path):
    """python -m macnat.fuzz --report puts its section at the end of benchmarks.md, replacing its last
    one; macnat bench, regenerating the file, carries it over."""
    path = tmp_path / "benchmarks.md"
    path.write_text("# macnat benchmarks\n\n## 5. Cost of running it\n")
    report = fuzz.Report(10, 1, 1.0, 0, {p: {"frames": 10, "ok": 5, "redirected": 3, "dropped": 2, "not run": 0,
                                            "seconds": 0.1} for p in constants.PROGRAMS}, {"refused_claim": 4})
    fuzz.write_into(path, report)
    fuzz.write_into(path, report)
    text = path.read_text()
    assert text.count("## 9. Hostile frames") == 1 and "**Violations found: 0**" in text
    assert text.startswith("# macnat benchmarks\n\n## 5. Cost of running it\n")
    assert fuzz.carried_over("# regenerated\n" + text[text.index(fuzz.REPORT_MARK):]).strip().startswith(fuzz.REPORT_MARK)
