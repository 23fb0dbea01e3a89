"""doctor's parsers and decisions, from messages and files built by hand: nl80211 (the lab has no
cfg80211; the hwsim VM test runs them on the real stack), ifupdown2's interfaces file, NetworkManager's
configuration, VLANs, ARP frames; and every troubleshooting link a finding can carry."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from pyroute2.netlink.nl80211 import NL80211_NAMES, nl80211cmd
from scapy.all import ARP, Ether

from macnat import nl80211
from macnat.doctor import arp, ifupdown, nm, topics
from macnat.doctor.core import OK, WARNING
from macnat.doctor.interfaces import vlan_result
from macnat.doctor.probe import minimal_btf

DOCS = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"


def nla(table: tuple, name: str, payload: bytes) -> bytes:
    """A netlink attribute, numbered as nl80211.h numbers it (the position in pyroute2's table)."""
    raw = struct.pack("HH", 4 + len(payload), [n for n, _ in table].index(name)) + payload
    return raw + bytes(-len(raw) % 4)


def kernel_message(command: str, *attrs: bytes) -> nl80211cmd:
    """A generic netlink message built byte by byte as the kernel sends it, decoded as IW receives it."""
    body = struct.pack("BBH", NL80211_NAMES[command], 1, 0) + b"".join(attrs)
    msg = nl80211cmd(struct.pack("IHHII", 16 + len(body), 0x1C, 0, 1, 0) + body)
    msg.decode()
    return msg


ATTRS, BSS = nl80211cmd.nla_map, nl80211cmd.bss.nla_map


def interface_message(iftype: int, four: int, ssid: bytes | None = None) -> nl80211cmd:
    attrs = [nla(ATTRS, "NL80211_ATTR_IFINDEX", struct.pack("I", 5)), nla(ATTRS, "NL80211_ATTR_IFNAME", b"wlan1\0"),
             nla(ATTRS, "NL80211_ATTR_WIPHY", struct.pack("I", 1)), nla(ATTRS, "NL80211_ATTR_IFTYPE", struct.pack("I", iftype)),
             nla(ATTRS, "NL80211_ATTR_4ADDR", bytes([four]))]
    return kernel_message("NL80211_CMD_NEW_INTERFACE", *attrs, *([nla(ATTRS, "NL80211_ATTR_SSID", ssid)] if ssid else []))


def test_a_station_interface():
    iface = nl80211.parse_interface(interface_message(iftype=2, four=0))
    assert iface == nl80211.Interface(index=5, name="wlan1", wiphy=1, iftype="station", use_4addr=False, ssid=None)
    assert nl80211.parse_interface(interface_message(iftype=2, four=0, ssid=b"macnat-hwsim")).ssid == "macnat-hwsim"


def test_4_address_mode_and_other_interface_types():
    assert nl80211.parse_interface(interface_message(iftype=2, four=1)).use_4addr
    assert nl80211.parse_interface(interface_message(iftype=3, four=0)).iftype == "ap"
    assert nl80211.parse_interface(interface_message(iftype=42, four=0)).iftype == "type 42"


def scan_result(bssid: str, frequency: int, status: int | None, ssid: bytes = b"macnat-hwsim") -> nl80211cmd:
    elements = bytes([0, len(ssid)]) + ssid + bytes([1, 4, 0x82, 0x84, 0x8B, 0x96])  # SSID, supported rates
    bss = [nla(BSS, "NL80211_BSS_BSSID", bytes.fromhex(bssid.replace(":", ""))),
           nla(BSS, "NL80211_BSS_FREQUENCY", struct.pack("I", frequency)),
           nla(BSS, "NL80211_BSS_INFORMATION_ELEMENTS", elements)]
    if status is not None:
        bss.append(nla(BSS, "NL80211_BSS_STATUS", struct.pack("I", status)))
    return kernel_message("NL80211_CMD_NEW_SCAN_RESULTS", nla(ATTRS, "NL80211_ATTR_IFINDEX", struct.pack("I", 5)),
                          nla(ATTRS, "NL80211_ATTR_BSS", b"".join(bss)))


def test_the_associated_bss_among_the_scan_results():
    seen = [scan_result("02:00:00:00:02:00", 5180, None, b"neighbours"), scan_result("02:00:00:00:00:00", 2412, 1)]
    associated = nl80211.parse_associated_bss(seen)
    assert associated == nl80211.Bss("02:00:00:00:00:00", 2412, "macnat-hwsim")
    assert nl80211.network_name(nl80211.parse_interface(interface_message(2, 0)), associated) == "macnat-hwsim"
    assert nl80211.parse_associated_bss([scan_result("02:00:00:00:00:00", 2412, 0)]) is None  # authenticated only
    assert nl80211.parse_associated_bss([]) is None


def test_ifupdown2_stanzas_through_source_includes(tmp_path):
    (tmp_path / "etc/network/interfaces.d").mkdir(parents=True)
    (tmp_path / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\n\n# a comment\nsource /etc/network/interfaces.d/*\n\n"
        "iface vmbr0 inet6 static\n    address fd00::2/64\n")
    (tmp_path / "etc/network/interfaces.d/vmbr0").write_text(
        "auto vmbr0\niface vmbr0 inet static\n    address 10.0.0.2/24\n    bridge-ports eno1 \\\n"
        "        tap101i0\n    bridge-ports-condone-regex ^(tap|veth)\n    bridge-ports-condone-regex ^x\n")
    stanzas = ifupdown.parse(tmp_path / "etc/network/interfaces", tmp_path)
    assert set(stanzas) == {"lo", "vmbr0"}
    vmbr0 = stanzas["vmbr0"]
    assert vmbr0.options["bridge-ports"] == ["eno1 tap101i0"]
    assert vmbr0.option("bridge-ports-condone-regex") == "^(tap|veth)"  # the first, as ifupdown2 reads it
    assert vmbr0.options["address"] == ["10.0.0.2/24", "fd00::2/64"]  # inet and inet6 stanzas merged
    assert ifupdown.listed("eno1 tap101i0", "tap101i0") and not ifupdown.listed("eno1", "vethmnwlan0")
    assert ifupdown.listed("eno1 regex veth.*", "vethmnwlan0") and not ifupdown.listed("none", "vethmnwlan0")


def test_networkmanager_config_order_and_device_specs(tmp_path):
    for d in ("usr/lib/NetworkManager/conf.d", "etc/NetworkManager/conf.d"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "etc/NetworkManager/NetworkManager.conf").write_text("[keyfile]\nunmanaged-devices=interface-name:mnpeer*\n")
    (tmp_path / "usr/lib/NetworkManager/conf.d/20-veth.conf").write_text("[device-veth]\nmatch-device=type:veth\nmanaged=1\n")
    (tmp_path / "etc/NetworkManager/conf.d/20-veth.conf").write_text("[device-veth]\nmatch-device=driver:veth;"
                                                                     "except:interface-name:vethmn*\nmanaged=yes\n")
    files = nm.config_files(tmp_path)
    assert files == [tmp_path / "etc/NetworkManager/NetworkManager.conf", tmp_path / "etc/NetworkManager/conf.d/20-veth.conf"]
    uplink, peer, other = (nm.Device(n, "veth", "veth") for n in ("vethmnwlan0", "mnpeerwlan0", "veth101"))
    assert nm.claim(files, uplink) is None  # excepted from the device section, not listed as unmanaged
    assert nm.claim(files, peer) == nm.Claim(True, f"{files[1]} [device-veth] managed=yes")  # over unmanaged-devices
    assert nm.claim(files, other).managed
    (tmp_path / "etc/NetworkManager/conf.d/20-veth.conf").unlink()  # /usr/lib's file of that name is read again
    shadowed = tmp_path / "usr/lib/NetworkManager/conf.d/20-veth.conf"
    assert nm.claim(nm.config_files(tmp_path), uplink) == nm.Claim(True, f"{shadowed} [device-veth] managed=1")
    shadowed.unlink()
    assert nm.claim(nm.config_files(tmp_path), peer) == \
        nm.Claim(False, f"{files[0]} [keyfile] unmanaged-devices=interface-name:mnpeer*")
    assert nm.matches("*", other) and nm.matches("interface-name:=veth101", other)
    assert nm.matches("interface-name:~VETH*", other) and not nm.matches("mac:00:11:22:33:44:55", other)
    assert nm.matches("except:type:bridge", other) and not nm.matches("except:type:veth", other)


def test_vlans_on_a_vlan_aware_bridge():
    ports = {"tap101": [{"vlan": 1, "flags": ["PVID", "Egress Untagged"]}],
             "tap102": [{"vlan": 10, "flags": ["PVID", "Egress Untagged"]}],
             "vethmnwlan0": [{"vlan": 1, "flags": ["PVID", "Egress Untagged"]}]}
    result = vlan_result("vmbr0", True, 1, ports, "vethmnwlan0")
    assert result.verdict == WARNING and "tap102 is on VLAN 10" in result.found
    assert result.fix.startswith("bridge vlan add dev tap102 vid 1 pvid untagged")
    del ports["tap102"]
    assert vlan_result("vmbr0", True, 1, ports, "vethmnwlan0").verdict == OK
    ports["vethmnwlan0"].append({"vlan": 20, "flags": []})
    assert "vethmnwlan0 carries tagged VLAN 20" in vlan_result("vmbr0", True, 1, ports, "vethmnwlan0").found
    assert vlan_result("vmbr0", False, 1, {}, "vethmnwlan0").verdict == OK


def test_arp_request_and_reply_frames():
    frame = Ether(arp.request("02:4d:4e:00:00:0a", "192.168.77.10", "192.168.77.134"))
    assert frame.dst == "ff:ff:ff:ff:ff:ff" and frame.src == "02:4d:4e:00:00:0a"
    assert (frame[ARP].op, frame[ARP].psrc, frame[ARP].pdst, frame[ARP].hwsrc) == \
        (1, "192.168.77.10", "192.168.77.134", "02:4d:4e:00:00:0a")
    reply = Ether(src="02:4d:4e:00:00:0a", dst="02:4d:4e:00:00:0a") / ARP(
        op=2, hwsrc="02:4d:4e:00:00:0a", psrc="192.168.77.134", hwdst="02:4d:4e:00:00:0a", pdst="192.168.77.10")
    assert arp.parse_reply(bytes(reply)) == arp.Reply("192.168.77.134", "02:4d:4e:00:00:0a", "02:4d:4e:00:00:0a")
    assert arp.parse_reply(bytes(Ether() / ARP(op=1))) is None


def test_the_btf_blob_the_probe_loads_is_well_formed():
    blob = minimal_btf()
    assert blob[:2] == b"\x9f\xeb" and blob.endswith(b"\0int\0") and len(blob) == 24 + 16 + 5


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("name, anchor", sorted(topics.all_topics().items()))
def test_every_finding_links_to_an_entry_that_exists(name, anchor):
    assert anchor in github_anchors(DOCS.read_text()), f"docs/troubleshooting.md has no heading for #{anchor} ({name})"


def test_every_topic_is_used_by_a_check():
    source = "".join(p.read_text() for p in (Path(topics.__file__).parent).glob("*.py") if p.name != "topics.py")
    assert {name for name in topics.all_topics() if f"topics.{name}" not in source} == set()
