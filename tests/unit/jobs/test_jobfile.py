"""Job files: the reference example parses; every bad file is one line naming the key and its line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from vmsnap.errors import LibvirtError, UsageError
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import JobConfig, load_job, parse_job
from vmsnap.jobs.toml_lines import KeyLines
from vmsnap.repo.retention import RetentionPolicy
from vmsnap.vm.hosts import HostSpec

GOOD = """\
# nightly backups
repository = "/backups"
key_file = "keys/repo.key"
incremental = true
concurrency = 2
metrics = "/var/lib/node/vmsnap.prom"
gc = true
ssh_config = "ssh_config"
on_failure = [
    "/usr/local/bin/notify",   # a comment with = and [ in it
    "--to", "ops@example.org",
]

[retention]
keep_daily = 7
keep_weekly = 4

[[vm]]
qmp = "/run/vm1.qmp"
agent = "/run/vm1.qga"
name = "vm1"

[[vm]]
domain = "web-*"
exclude = ["web-test"]
strategy = "backup"

[[vm]]
image = ["/images/db.qcow2", "/images/db-logs.qcow2"]
host = "root@hv2:2222"
quiesce = "off"
disks = ["db"]
"""


def domains(*names: str) -> Listing:
    return Listing(list(names))


class Listing:
    """list_domains for tests: fixed names, records the URIs asked for."""

    def __init__(self, names: Sequence[str], error: Exception | None = None) -> None:
        self.names = list(names)
        self.error = error
        self.asked: list[str | None] = []

    def __call__(self, uri: str | None) -> Sequence[str]:
        self.asked.append(uri)
        if self.error is not None:
            raise self.error
        return self.names


def parse(text: str) -> JobConfig:
    return parse_job(text, path=Path("/etc/vmsnap/nightly.toml"))


def test_the_reference_example_parses() -> None:
    job = parse(GOOD)
    assert job.name == "nightly"
    assert job.repository == "/backups"
    assert job.key_file == Path("/etc/vmsnap/keys/repo.key")  # relative to the job file
    assert (job.incremental, job.concurrency) == (True, 2)
    assert job.metrics == Path("/var/lib/node/vmsnap.prom")
    assert job.on_failure == ("/usr/local/bin/notify", "--to", "ops@example.org")
    assert job.retention == RetentionPolicy(keep_daily=7, keep_weekly=4)
    assert job.gc and job.ssh_config == Path("/etc/vmsnap/ssh_config")
    qemu, libvirt, image = job.vms
    assert (qemu.kind, qemu.line, qemu.qmp, qemu.name) == ("qemu", 19, Path("/run/vm1.qmp"), "vm1")
    assert (libvirt.kind, libvirt.line, libvirt.exclude, libvirt.strategy) == (
        "libvirt",
        24,
        ("web-test",),
        "backup",
    )
    assert image.host == HostSpec("hv2", "root", 2222)
    assert image.images == (Path("/images/db.qcow2"), Path("/images/db-logs.qcow2"))
    listing = domains("web-1", "web-2", "web-test", "db")
    specs, failures = expand_vms(job, listing)
    assert failures == ()
    assert [s.name for s in specs] == ["vm1", "web-1", "web-2", "db"]
    assert listing.asked == [None]
    assert all(s.repository == "/backups" and s.incremental for s in specs)
    assert specs[3].quiesce == "off" and specs[3].disks == ("db",)


def test_defaults_and_metrics_default_directory(tmp_path: Path) -> None:
    text = 'repository = "repo"\n[[vm]]\nqmp = "/run/a.qmp"\n'
    job = parse_job(text, path=tmp_path / "daily.toml", default_metrics_dir=tmp_path)
    assert (job.incremental, job.concurrency, job.retention, job.on_failure) == (True, 1, None, ())
    assert (job.gc, job.ssh_config) == (False, None)
    assert job.repository == str(tmp_path / "repo")
    assert job.metrics == tmp_path / "vmsnap-daily.prom"
    assert parse_job(text, path=tmp_path / "daily.toml").metrics is None  # no such directory: no metrics
    assert parse_job(text + "", path=tmp_path / "d.toml").vms[0].name is None
    off = parse_job("metrics = false\n" + text, path=tmp_path / "d.toml", default_metrics_dir=tmp_path)
    assert off.metrics is None
    specs, _ = expand_vms(job, domains())
    assert specs[0].name == "a"  # the QMP socket's stem


def test_load_job_reads_the_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "web.toml"
    path.write_text('repository = "/r"\n[[vm]]\nqmp = "/run/a.qmp"\nqmpp = 1\n')
    with pytest.raises(UsageError) as info:
        load_job(path)
    assert str(path) in str(info.value) and "line 4" in str(info.value)
    with pytest.raises(UsageError, match="cannot read job file"):
        load_job(tmp_path / "missing.toml")


HEADER = 'repository = "/backups"\n'
VM = '[[vm]]\nqmp = "/run/a.qmp"\n'

# (file text, line expected in the message, text expected in the message)
BAD_FILES = [
    pytest.param(HEADER + "concurency = 2\n" + VM, 2, "'concurency'", id="unknown top-level key"),
    pytest.param(HEADER + "concurrency = 'two'\n" + VM, 2, "concurrency", id="concurrency type"),
    pytest.param(HEADER + "concurrency = 0\n" + VM, 2, "concurrency", id="concurrency range"),
    pytest.param(HEADER + "incremental = 'yes'\n" + VM, 2, "incremental", id="incremental type"),
    pytest.param(HEADER + "on_failure = 'mail root'\n" + VM, 2, "on_failure", id="on_failure is not argv"),
    pytest.param(HEADER + "on_failure = ['mail', 3]\n" + VM, 2, "on_failure", id="on_failure item type"),
    pytest.param(HEADER + "metrics = 'x.txt'\n" + VM, 2, "metrics", id="metrics not .prom"),
    pytest.param(HEADER + "key_file = 5\n" + VM, 2, "key_file", id="key_file type"),
    pytest.param(HEADER + "gc = 'weekly'\n" + VM, 2, "gc must be true or false", id="gc type"),
    pytest.param(HEADER + "gc_after = true\n" + VM, 2, "'gc_after'", id="unknown gc key"),
    pytest.param(HEADER + "ssh_config = ['a']\n" + VM, 2, "ssh_config", id="ssh_config type"),
    pytest.param("repository = 'ftp://x/y'\n" + VM, 1, "repository", id="repository scheme"),
    pytest.param("repository = 7\n" + VM, 1, "repository", id="repository type"),
    pytest.param(VM, 1, "repository is missing", id="no repository"),
    pytest.param(HEADER, 1, "no VM", id="no vm"),
    pytest.param(HEADER + "vm = 'all'\n", 2, "vm must be an array of tables", id="vm not tables"),
    pytest.param(
        HEADER + "\n[retention]\nkeep_daily = 7\nkeep_dayly = 3\n" + VM, 5, "'keep_dayly'", id="retention key"
    ),
    pytest.param(HEADER + "[retention]\nkeep_daily = -1\n" + VM, 3, "keep_daily", id="retention negative"),
    pytest.param(HEADER + "[retention]\nkeep_weekly = 1.5\n" + VM, 3, "keep_weekly", id="retention float"),
    pytest.param(
        HEADER + "[retention]\nkeep_daily = 0\n" + VM, 2, "keeps no backup", id="retention keeps nothing"
    ),
    pytest.param(HEADER + "retention = 7\n" + VM, 2, "retention must be a table", id="retention not a table"),
    pytest.param(
        HEADER + "retention = { keep_daily = 7, keep_hours = 1 }\n" + VM, 2, "keep_hours", id="inline"
    ),
    pytest.param(HEADER + "retention.keep_yearly = 'x'\n" + VM, 2, "keep_yearly", id="dotted key"),
    pytest.param(HEADER + VM + "agnet = '/run/a.qga'\n", 4, "'agnet'", id="unknown vm key"),
    pytest.param(
        HEADER + VM + "[[vm]]\nname = 'b'\n", 4, "exactly one of qmp, domain, image", id="no selector"
    ),
    pytest.param(HEADER + VM + "domain = 'x'\n", 4, "found qmp and domain", id="two selectors"),
    pytest.param(HEADER + VM + "exclude = ['x']\n", 4, "exclude", id="exclude with qmp"),
    pytest.param(HEADER + "[[vm]]\ndomain = 'x'\nname = 'y'\n", 4, "name", id="name with domain"),
    pytest.param(HEADER + "[[vm]]\ndomain = 'x'\nagent = '/a'\n", 4, "agent", id="agent with domain"),
    pytest.param(HEADER + VM + "host = 'root@'\n", 4, "host", id="host without name"),
    pytest.param(HEADER + VM + "host = '-oProxyCommand=x'\n", 4, "host", id="host option injection"),
    pytest.param(HEADER + VM + "host = 'root@hv2:99999'\n", 4, "port", id="host port"),
    pytest.param(HEADER + VM + "host = 'ro ot@hv2'\n", 4, "user", id="host user"),
    pytest.param(HEADER + VM + "host = 22\n", 4, "host", id="host type"),
    pytest.param(HEADER + "[[vm]]\nqmp = 'rel.qmp'\nhost = 'hv2'\n", 3, "qmp", id="relative remote path"),
    pytest.param(
        HEADER + "[[vm]]\ndomain='a'\nhost = 'hv2'\nconnect = 'qemu:///system'\n", 5, "connect", id="both"
    ),
    pytest.param(HEADER + VM + "quiesce = 'maybe'\n", 4, "quiesce", id="quiesce value"),
    pytest.param(HEADER + VM + "strategy = 'Back Up'\n", 4, "strategy", id="strategy name"),
    pytest.param(HEADER + VM + "disks = ['../etc']\n", 4, "disk name", id="disk name"),
    pytest.param(HEADER + VM + "disks = 'vda'\n", 4, "disks", id="disks type"),
    pytest.param(HEADER + VM + "name = 'a/b'\n", 4, "VM name", id="vm name"),
    pytest.param(HEADER + "[[vm]]\nimage = []\n", 3, "image", id="no image"),
    pytest.param(
        HEADER + 'key_file = """/etc/\\\n key"""\n[[vm]]\nqmp = "/a"\n\n\nqmpz = 1\n',
        8,
        "qmpz",
        id="after multi-line",
    ),
    pytest.param(HEADER + "concurrency = 2\nconcurrency = 3\n" + VM, 3, "not valid TOML", id="duplicate key"),
]


@pytest.mark.parametrize(("text", "line", "expected"), BAD_FILES)
def test_bad_files_are_one_line_naming_the_key_and_line(text: str, line: int, expected: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert f"line {line}" in message
    assert expected in message
    assert "/etc/vmsnap/nightly.toml" in message
    assert info.value.exit_code == 2


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(UsageError) as info:
        parse(HEADER + "[retention]\nkeep_dayly = 3\n" + VM)
    assert "keep_daily" in info.value.hint


def expand_error(text: str, listing: Listing) -> str:
    with pytest.raises(UsageError) as info:
        expand_vms(parse(text), listing)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_pattern_that_matches_nothing_names_its_line() -> None:
    text = HEADER + VM + "\n[[vm]]\n  domain = 'db-*'\n"
    message = expand_error(text, domains("web-1"))
    assert "line 6" in message and "'db-*'" in message and "matches nothing" in message
    excluded = HEADER + "[[vm]]\ndomain = 'web-*'\nexclude = 'web-*'\n"
    assert "matches only domains that exclude takes out (web-1)" in expand_error(excluded, domains("web-1"))
    exact = HEADER + "[[vm]]\ndomain = 'web-9'\n"
    assert "no libvirt domain" in expand_error(exact, domains("web-1"))


def test_a_vm_matched_twice_names_both_lines() -> None:
    text = HEADER + "[[vm]]\ndomain = 'web-*'\n[[vm]]\ndomain = 'web-2'\n"
    message = expand_error(text, domains("web-1", "web-2"))
    assert "line 5" in message and "line 3" in message and "web-2" in message
    sockets = HEADER + VM + '[[vm]]\nqmp = "/run/./a.qmp"\nname = "other"\n'
    assert "already by line 3" in expand_error(sockets, domains())


def test_two_vms_with_one_repository_name_are_refused() -> None:
    text = HEADER + VM + "[[vm]]\nqmp = '/run/other/a.qmp'\n"
    message = expand_error(text, domains())
    assert "'a'" in message and "line 5" in message and "line 3" in message


def test_domain_names_that_cannot_be_repository_names() -> None:
    text = HEADER + "[[vm]]\ndomain = '*'\n"
    assert "'bad name'" in expand_error(text, domains("bad name"))


def test_host_gives_the_libvirt_uri_and_an_unreachable_libvirt_fails_only_its_entry() -> None:
    text = HEADER + VM + "[[vm]]\ndomain = '*'\nhost = 'root@hv2'\n[[vm]]\ndomain = 'x*'\nhost = 'root@hv2'\n"
    listing = Listing([], error=LibvirtError("cannot connect"))
    specs, failures = expand_vms(parse(text), listing)
    assert [s.name for s in specs] == ["a"]
    assert [(f.line, f.label) for f in failures] == [
        (5, "domain * on root@hv2"),
        (8, "domain x* on root@hv2"),
    ]
    assert "qemu+ssh://root@hv2/system" in failures[0].error and "cannot connect" in failures[0].error
    assert listing.asked == ["qemu+ssh://root@hv2/system"]  # asked once per URI


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hv2", HostSpec("hv2")),
        ("root@hv2", HostSpec("hv2", "root")),
        ("root@hv2.example.org:2222", HostSpec("hv2.example.org", "root", 2222)),
        ("backup@10.0.0.7", HostSpec("10.0.0.7", "backup")),
        ("root@[2001:db8::1]:22", HostSpec("2001:db8::1", "root", 22)),
        ("root@2001:db8::1", HostSpec("2001:db8::1", "root")),
    ],
)
def test_host_specs(text: str, expected: HostSpec) -> None:
    spec = HostSpec.parse(text)
    assert spec == expected
    assert HostSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        " hv2",
        "-p22",
        "root@-x",
        "a@b@",
        "root@hv2:",
        "root@hv2:0",
        "root@[::1",
        "root@[::1]x",
        "h v",
        "x;y",
    ],
)
def test_bad_host_specs(text: str) -> None:
    with pytest.raises(UsageError):
        HostSpec.parse(text)


def test_libvirt_uri_of_a_host() -> None:
    assert HostSpec("hv2", "root").libvirt_uri() == "qemu+ssh://root@hv2/system"
    assert HostSpec("::1", None, 2222).libvirt_uri() == "qemu+ssh://[::1]:2222/system"


def test_key_lines_scanner() -> None:
    text = (
        "a = 1\n"
        's = """x\n[[vm]]\nb = 2\n"""\n'
        "t = '''\n'''\n"
        "arr = [\n  1,\n  { inner = 2 },\n]\n"
        "[tab]  # c\n"
        "'quoted key' = 3\n"
        "d.e = 4\n"
        "[[vm]]\n"
        "k = 5\n"
        "[[vm]]\n"
        "k = 6\n"
        'q = "a\\"[x] = 1"\n'
    )
    lines = KeyLines(text)
    assert lines.line((), "a") == 1
    assert lines.line((), "s") == 2
    assert lines.line((), "t") == 6
    assert lines.line((), "arr") == 8
    assert lines.line(("arr", 1), "inner") == 10
    assert lines.line(("tab",)) == 12
    assert lines.line(("tab",), "quoted key") == 13
    assert lines.line(("tab", "d"), "e") == 14
    assert lines.line(("vm", 0), "k") == 16
    assert lines.line(("vm", 1), "k") == 18
    assert lines.line(("vm", 1), "q") == 19
    assert lines.line(("vm", 1), "missing") == 17
    assert ("vm", 2) not in lines.tables and (("vm", 0), "b") not in lines.keys
