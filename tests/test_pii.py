"""Curate's PII step measured on a labelled set: snippets holding one email, phone, public IP, API key or private
key (which must go), and look-alikes (which must stay). `python tests/test_pii.py` prints the figures the README
quotes."""

import itertools
import json

from lm.curation import PIIRedactor

NAMES = ["ana", "li.wei", "j_smith", "o'brien", "marie-claire", "dev+ci", "x9", "ops.team", "k.tanaka", "raj"]
DOMAINS = ["example.com", "mail.example.org", "uni-heidelberg.de", "company.co.uk", "startup.io"]
EMAILS = [f"{n.replace(chr(39), '')}@{d}" for n, d in itertools.product(NAMES, DOMAINS)]
PHONES = [
    "+1 415-555-0132", "(415) 555-0199", "415.555.0143", "+44 20 7946 0958", "020 7946 0121", "+49 30 1234 5678",
    "+33 1 4020 5050", "(02) 9374 4000", "+61 2 9374 4000", "+81 3-1234-5678", "212-555-0175", "+1 (212) 555-0188",
    "0161 496 0732", "+353 1 234 5678", "650.253.0000", "+46 8 123 456 78", "(0)20 7946 0000", "+7 495 123-45-67",
    "+55 11 2345-6789", "+91 22 2345 6789",
    # added after the regex was widened, not tuned on
    "+1-800-555-0100", "+49 (0)30 1234 5678", "+34 912 345 678", "+39 06 1234 5678", "+86 10 1234 5678",
    "+82 2-312-3456", "+31 20 794 6000", "(212)555-0147", "030 12345678", "+27 21 123 4567",
]  # fmt: skip
PUBLIC_IPS = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "151.101.1.69", "140.82.112.3", "2001:4860:4860::8888"]
PUBLIC_IPS += ["104.16.132.229", "172.217.16.142", "13.107.42.14", "2606:4700:4700::1111", "23.21.150.121"]
PUBLIC_IPS += ["52.95.110.1", "185.199.108.153", "199.232.69.194", "31.13.71.36", "157.240.1.35", "17.253.144.10"]
PUBLIC_IPS += ["104.244.42.1", "198.41.0.4", "2a03:2880:f10e:83:face:b00c:0:25de"]
PUBLIC_IPS += ["2620:0:862:ed1a::1", "2a00:1450:4001:82b::200e", "2404:6800:4003:c00::8b", "45.33.32.156"]
PUBLIC_IPS += ["2001:67c:2e8:22::c100:68b", "80.67.169.12"]  # these two lines: added after IPv6 was, not tuned on
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def token(i: int, n: int, alphabet: str = ALNUM + "abcdefghijkmnopqrstuvwxyz") -> str:
    """A fixed, random-looking string: the i-th of its kind."""
    return "".join(alphabet[(i * 7919 + k * 104729) % len(alphabet)] for k in range(n))


KEYS = [f"AKIA{token(i, 16, ALNUM)}" for i in range(6)] + [f"ghp_{token(i, 36)}" for i in range(6)]
KEYS += [f"sk-{token(i, 40)}" for i in range(6)] + [f"xoxb-{token(i, 12)}-{token(i + 1, 24)}" for i in range(4)]
KEYS += [f"AIza{token(i, 35)}" for i in range(4)] + [f"github_pat_{token(i, 30)}" for i in range(4)]
ASSIGNED = [f'{name} = "{token(i, 32)}"' for i, name in enumerate(["api_key", "SECRET", "token", "password"] * 3)]
PRIVATE_KEYS = [
    f"-----BEGIN {kind}PRIVATE KEY-----\n{token(i, 64)}\n{token(i + 9, 64)}\n-----END {kind}PRIVATE KEY-----"
    for i, kind in enumerate(["RSA ", "", "EC ", "OPENSSH ", "DSA ", "ENCRYPTED "] * 2)
]
SENTENCES = [
    "Contact {} for details.", "Reach me at {} before Friday.", "{} is on call this week.",
    "Logs from {} arrived late.", "(see {})", "cfg: {}\n",
]  # fmt: skip

LOOK_ALIKES = {
    "emails": [
        "@property", "@dataclass(frozen=True)", "a @ b", "name at example dot com", "user@localhost", "x@y",
        "pip install pkg@git", "@media screen", "email@", "@example.com",
    ],
    "phones": [
        "2024-01-15", "version 1.2.3", "pi = 3.14159", "ISBN 978-3-16-148410-0", "12:30:45", "pages 100-200",
        "SHA 3f2a-91bc", "1999-2004", "port 8080", "3.11.7", "0.0001", "x = 1_000_000", "RFC 9110",
        "10 000 km", "lat 52.5200, lon 13.4050", "1 2 3 4 5",
        "at 2024-01-15 12:30:45", "range 100-200-300", "+1 2 3", "isbn 0-306-40615-2", "UTC+01:00",
        "matrix 1 0 0 0 1 0", "call 911", "+1 vote from 20 people",
    ],
    "ips": [
        "192.168.0.1", "10.0.0.7", "127.0.0.1", "Python 3.11.7", "version 2.0.1", "172.16.4.2", "::1",
        "0.5.0", "fe80::1", "v1.2.3",
        "a[1::2]", "std::vector<int>", "00:1a:2b:3c:4d:5e", "2001:db8::1", "::ffff:192.168.1.1", "fe80::1%eth0",
        "12:30:45.123",
    ],
    "keys": [
        "AKIA", "sk-learn", "ghp_short", "token = 'abc'", "password: ********",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "SECRET_NAME = os.environ['API_KEY']",
        "api_key = get_key()", "xoxb", "AIza-short", "sk_test", "token: null", "AKIAIOSFODNN7EXAMPL", "ghp_",
        "the secret is patience", "uuid 123e4567-e89b-12d3-a456-426614174000",
    ],
    "private keys": [
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----",
        "Store the private key in a vault.", "BEGIN PRIVATE KEY (quoted in docs, no block)",
    ],
}  # fmt: skip


def labelled() -> list[tuple[str, str, str | None]]:
    """(category, snippet, the PII value in it, or None for a look-alike that must stay)."""
    cases = []
    for category, values in (
        ("emails", EMAILS),
        ("phones", PHONES),
        ("ips", PUBLIC_IPS),
        ("keys", KEYS + ASSIGNED),
        ("private keys", PRIVATE_KEYS),
    ):
        for i, value in enumerate(values):
            cases.append((category, SENTENCES[i % len(SENTENCES)].format(value), value))
    for category, texts in LOOK_ALIKES.items():
        cases += [(category, SENTENCES[i % len(SENTENCES)].format(text), None) for i, text in enumerate(texts)]
    return cases


def secret_part(value: str) -> str:
    """What must be gone: the value of an assignment, the whole of anything else."""
    return value.split('"')[1] if '"' in value else value


def measure() -> dict[str, dict]:
    """Per category: true and false positives, misses, precision and recall of the redactor as curate runs it."""
    redactor = PIIRedactor(emails=True, ips=True, public_ips_only=True, phones=True, secrets=True)
    counts = {}
    for category, snippet, value in labelled():
        c = counts.setdefault(category, {"tp": 0, "fn": 0, "fp": 0, "tn": 0, "missed": []})
        redacted = redactor.format(snippet)
        if value is None:
            c["fp" if redacted != snippet else "tn"] += 1
        elif secret_part(value) in redacted:
            c["fn"] += 1
            c["missed"].append(value)
        else:
            c["tp"] += 1
    for c in counts.values():
        c["precision"] = c["tp"] / max(c["tp"] + c["fp"], 1)
        c["recall"] = c["tp"] / max(c["tp"] + c["fn"], 1)
    return counts


def test_the_labelled_set_is_large_enough():
    cases = labelled()
    assert len(cases) >= 200 and len({c[1] for c in cases}) == len(cases), "200+ distinct snippets"


# the bars: recall >= 0.95 on emails and keys; elsewhere today's figures (README), so that a change that loses
# recall or precision shows. Today: one phone missed (a national number with one group of 8 digits) and one
# look-alike taken for a phone (three dash-joined numbers).
RECALL = {"emails": 0.95, "keys": 0.95, "private keys": 0.95, "phones": 0.95, "ips": 0.95}


def test_pii_redaction_meets_its_bars():
    for category, c in measure().items():
        assert c["recall"] >= RECALL[category] and c["precision"] >= 0.95, (category, c)


if __name__ == "__main__":
    for category, c in measure().items():
        print(json.dumps({"category": category} | c))
