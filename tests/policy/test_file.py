"""Policy files: every kind of mistake is reported with its line and key, all at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igd.model import Mechanism, Protocol
from igd.policy import Action, Defaults, Policy, PolicyFileError, PolicyIssue
from igd.policy.locate import locate
from igd.ports import PortSet

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def issues(text: str) -> list[PolicyIssue]:
    with pytest.raises(PolicyFileError) as caught:
        Policy.parse(text, "p.toml")
    return caught.value.issues


def only_issue(text: str) -> PolicyIssue:
    found = issues(text)
    assert len(found) == 1, found
    return found[0]


RULE = '[[rules]]\nname = "r"\naction = "allow"\n'


def test_every_key_is_read() -> None:
    p = Policy.parse(
        """
[defaults]
action = "allow"
secure_mode = false
max_lease = 7200
min_lease = 60
max_mappings_per_client = 5
max_mappings = 50

[[rules]]
name = "everything"
action = "deny"
clients = ["192.168.1.0/24", "10.0.0.1"]
internal_addresses = ["192.168.1.64/26"]
internal_ports = "21,23,137-139"
external_ports = 8080
protocols = ["TCP", "udp"]
via = ["upnp", "pcp"]
description = "^x"
max_lease = 600
max_mappings_per_client = 9
allow_third_party = true
"""
    )
    assert p.defaults == Defaults(Action.ALLOW, False, 7200, 60, 5, 50)
    (rule,) = p.rules
    assert rule.name == "everything" and rule.action is Action.DENY
    assert [str(net) for net in rule.clients or ()] == ["192.168.1.0/24", "10.0.0.1/32"]
    assert [str(net) for net in rule.internal_addresses or ()] == ["192.168.1.64/26"]
    assert rule.internal_ports == PortSet.parse("21,23,137-139")
    assert rule.external_ports == PortSet.parse("8080")
    assert rule.protocols == {Protocol.TCP, Protocol.UDP}
    assert rule.via == {Mechanism.UPNP, Mechanism.PCP}
    assert rule.description is not None and rule.description.pattern == "^x"
    assert (rule.max_lease, rule.max_mappings_per_client) == (600, 9)
    assert rule.allow_third_party and rule.line == 10


def test_absent_defaults_are_the_documented_ones() -> None:
    assert Policy.parse("").defaults == Defaults(
        action=Action.DENY,
        secure_mode=True,
        max_lease=86400,
        min_lease=120,
        max_mappings_per_client=64,
        max_mappings=10000,
    )


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        # TOML syntax: tomllib's position is turned into the line.
        ('[defaults]\naction = "deny"\nmax_lease = 12 34\n', 3, "syntax", "column"),
        ('[defaults]\naction = "deny\n', 2, "syntax", "Illegal character"),
        ("[defaults]\nmax_lease = \n", 2, "syntax", "Invalid value"),
        ("[defaults]\n[defaults]\n", 2, "syntax", "twice"),
        # Unknown keys, with a suggestion when one is close.
        ("colour = 1\n", 1, "colour", "unknown key 'colour' in the top level"),
        ("[defaults]\n\nmax_leases = 5\n", 3, "defaults.max_leases", "did you mean 'max_lease'"),
        (RULE + "clinets = []\n", 4, "rules[0].clinets", "did you mean 'clients'"),
        ("[rule]\nname = 1\n", 1, "rule", "did you mean 'rules'"),
        # Wrong types.
        ('[defaults]\nmax_lease = "1h"\n', 2, "defaults.max_lease", "want an integer, got string"),
        ("[defaults]\nmax_lease = true\n", 2, "defaults.max_lease", "want an integer, got boolean"),
        ('[defaults]\nsecure_mode = "yes"\n', 2, "defaults.secure_mode", "want true or false"),
        ("defaults = 3\n", 1, "defaults", "want a table"),
        ('rules = "none"\n', 1, "rules", "want an array of tables"),
        ("rules = [1]\n", 1, "rules[0]", "want a table, got integer"),
        (
            RULE + 'clients = "192.168.1.0/24"\n',
            4,
            "rules[0].clients",
            'want an array of strings, e.g. ["192.168.1.0/24", "2001:db8:1::/64"], got string',
        ),
        (RULE + "clients = [10]\n", 4, "rules[0].clients", "want a string, got integer"),
        (RULE + "allow_third_party = 1\n", 4, "rules[0].allow_third_party", "want true or false"),
        (RULE + "max_lease = 1.5\n", 4, "rules[0].max_lease", "want an integer, got float"),
        (RULE + "internal_ports = [80]\n", 4, "rules[0].internal_ports", "got array"),
        # Addresses.
        (RULE + 'clients = ["lan"]\n', 4, "rules[0].clients", "'lan' is not an IPv4 or IPv6"),
        (RULE + 'clients = ["192.168.1.300"]\n', 4, "rules[0].clients", "not an IPv4"),
        (
            RULE + 'clients = ["192.168.1.1/24"]\n',
            4,
            "rules[0].clients",
            "host bits set; write '192.168.1.0/24' for the network or '192.168.1.1/32'",
        ),
        (
            RULE + 'internal_addresses = ["2001:db8:0:77::1/64"]\n',
            4,
            "rules[0].internal_addresses",
            "write '2001:db8:0:77::/64' for the network or '2001:db8:0:77::1/128' for the host",
        ),
        (
            '[[forwards]]\nname = "f"\nprotocols = ["tcp"]\nexternal_ports = "80"\n'
            'internal_address = "192.168.1.2"\nremote_hosts = ["2001:db8::/32"]\n',
            6,
            "forwards[0].remote_hosts",
            "'2001:db8::/32' is IPv6; a forward maps IPv4 only",
        ),
        (RULE + "clients = []\n", 4, "rules[0].clients", "empty array matches nothing"),
        # Port ranges.
        (RULE + 'internal_ports = "80-70"\n', 4, "rules[0].internal_ports", "runs backwards"),
        (RULE + 'external_ports = "http"\n', 4, "rules[0].external_ports", "malformed"),
        (RULE + "external_ports = 70000\n", 4, "rules[0].external_ports", "above 65535"),
        (RULE + 'external_ports = ""\n', 4, "rules[0].external_ports", "empty port range"),
        # Enumerations.
        ('[defaults]\naction = "accept"\n', 2, "defaults.action", "unknown action 'accept'"),
        ('[[rules]]\nname = "r"\naction = "drop"\n', 3, "rules[0].action", '"allow" or "deny"'),
        (RULE + 'protocols = ["sctp"]\n', 4, "rules[0].protocols", "want one of: tcp, udp"),
        (RULE + 'via = ["igd"]\n', 4, "rules[0].via", "want one of: upnp, natpmp, pcp"),
        # Regular expression.
        (RULE + 'description = "([a-z]"\n', 4, "rules[0].description", "bad regular expression"),
        (RULE + "description = '[[:alpha:]]'\n", 4, "rules[0].description", "nested set"),
        # Numbers.
        (
            "[defaults]\nmax_mappings = -1\n",
            2,
            "defaults.max_mappings",
            "-1 is below the minimum 0",
        ),
        ("[defaults]\nmin_lease = 0\n", 2, "defaults.min_lease", "below the minimum 1"),
        (RULE + "max_mappings_per_client = -3\n", 4, "rules[0].max_mappings_per_client", "below"),
        (
            "[defaults]\nmin_lease = 600\nmax_lease = 300\n",
            2,
            "defaults.min_lease",
            "min_lease 600 is above max_lease 300",
        ),
        (RULE + "max_lease = 90000\n", 4, "rules[0].max_lease", "above defaults.max_lease 86400"),
        (RULE + "max_lease = 60\n", 4, "rules[0].max_lease", "below defaults.min_lease 120"),
        # Names.
        ('[[rules]]\naction = "deny"\n', 1, "rules[0].name", "required key is missing"),
        ('[[rules]]\nname = "x"\n', 1, "rules[0].action", "required key is missing"),
        ('[[rules]]\nname = " "\naction = "deny"\n', 2, "rules[0].name", "rule name is empty"),
        ('[[rules]]\nname = "defaults"\naction = "deny"\n', 2, "rules[0].name", "reserved"),
        ('[[rules]]\nname = "a\\nb"\naction = "deny"\n', 2, "rules[0].name", "control characters"),
    ],
)
def test_each_mistake_is_reported_at_its_line(text: str, line: int, key: str, message: str) -> None:
    issue = only_issue(text)
    assert (issue.source, issue.line, issue.key) == ("p.toml", line, key)
    assert message in issue.message


def test_duplicate_rule_names_point_at_both_rules() -> None:
    text = (
        '[[rules]]\nname = "web"\naction = "allow"\n\n'
        '[[rules]]\nname = "ssh"\naction = "deny"\n\n'
        '[[rules]]\naction = "deny"\nname = "web"\n'
    )
    issue = only_issue(text)
    assert (issue.line, issue.key) == (11, "rules[2].name")
    assert issue.message == "duplicate rule name 'web' (first used on line 2)"


def test_all_mistakes_are_reported_together_in_file_order() -> None:
    text = """\
[defaults]
action = "maybe"
max_lease = 100
min_lease = 500

[[rules]]
name = "lan"
action = "allow"
clients = [
    "192.168.1.0/24",
    "192.168.2.7/24",   # host bits
    "fe80::1/10",       # host bits
]
protocols = ["tcp", "icmp"]

[[rules]]
name = "lan"
actoin = "deny"
"""
    with pytest.raises(PolicyFileError) as caught:
        Policy.parse(text, "home.toml")
    assert [(i.line, i.key) for i in caught.value.issues] == [
        (2, "defaults.action"),
        (4, "defaults.min_lease"),
        (11, "rules[0].clients"),
        (12, "rules[0].clients"),
        (14, "rules[0].protocols"),
        (16, "rules[1].action"),
        (17, "rules[1].name"),
        (18, "rules[1].actoin"),
    ]
    lines = str(caught.value).splitlines()
    assert len(lines) == 8
    assert lines[0] == (
        'home.toml:2: defaults.action: unknown action \'maybe\' (want "allow" or "deny")'
    )
    assert all(re.match(r"home\.toml:\d+: [\w.\[\]]+: .+", line) for line in lines)


def test_a_mistake_in_defaults_does_not_cascade_into_rules() -> None:
    # max_lease is unusable, so rules are not also blamed for exceeding it.
    found = issues('[defaults]\nmax_lease = "long"\n' + RULE + "max_lease = 100000\n")
    assert [i.key for i in found] == ["defaults.max_lease"]


def test_dotted_and_inline_tables_are_located() -> None:
    text = (
        "# policy written with dotted keys and inline tables\n"
        'defaults.action = "deny"\n'
        "defaults.max_lease = -5\n"
        "rules = [\n"
        '  { name = "a", action = "allow" },\n'
        '  { name = "b", action = "allow", via = ["upnp", "smtp"] },\n'
        "]\n"
    )
    found = issues(text)
    assert [(i.line, i.key) for i in found] == [
        (3, "defaults.max_lease"),
        (6, "rules[1].via"),
    ]


def test_headers_and_keys_inside_strings_and_comments_are_ignored() -> None:
    text = '''\
[[rules]]   # first rule; a comment mentioning [[rules]] and name = "x"
name = "first"
action = "allow"
notes = """a note
[[rules]]
name = "fake\\""""

[[rules]]
name = 'second'
action = "deny"
internal_ports = "23"  # telnet [x]
max_lease = 0
'''
    found = issues(text)
    assert [(i.line, i.key) for i in found] == [(4, "rules[0].notes"), (12, "rules[1].max_lease")]
    assert locate(text)[("rules", 1)] == 8


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.toml")), ids=lambda p: p.name)
def test_locator_finds_every_header_and_key_of_the_shipped_policies(path: Path) -> None:
    text = path.read_text()
    source_lines = text.splitlines()
    located = locate(text)
    headers = [n for n, line in enumerate(source_lines, 1) if line.startswith("[[rules]]")]
    rules = Policy.load(path).rules
    assert [located[("rules", index)] for index in range(len(rules))] == headers
    assert [rule.line for rule in rules] == headers
    for key_path, line in located.items():
        if isinstance(key_path[-1], str) and len(key_path) > 1:
            assert source_lines[line - 1].startswith(f"{key_path[-1]} =")


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(PolicyFileError) as caught:
        Policy.load(missing)
    assert str(caught.value) == f"{missing}: file: cannot read: No such file or directory"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[defaults]\naction = "deny"\n# caf\xe9\n')
    with pytest.raises(PolicyFileError) as caught:
        Policy.load(latin1)
    assert (caught.value.issues[0].line, caught.value.issues[0].key) == (3, "file")


def test_load_names_the_file_in_every_issue(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[defaults]\naction = "nope"\n')
    with pytest.raises(PolicyFileError) as caught:
        Policy.load(path)
    assert str(caught.value).startswith(f"{path}:2: defaults.action: ")
    path.write_text('[defaults]\naction = "allow"\n')
    assert Policy.load(path).source == str(path)


HOME_TEXT = (POLICIES / "home.toml").read_text()


@settings(max_examples=300)
@given(st.data())
def test_any_damaged_file_gives_policy_file_error_with_lines_in_the_file(
    data: st.DataObject,
) -> None:
    text = HOME_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 40)))
        insert = data.draw(st.sampled_from(["", "[", "]", '"', "=", "\n", "x = 1\n", "-", "#"]))
        text = text[:start] + insert + text[end:]
    try:
        Policy.parse(text, "damaged.toml")
    except PolicyFileError as error:
        assert error.issues
        for issue in error.issues:
            assert issue.line is None or 1 <= issue.line <= max(1, len(text.splitlines()))
