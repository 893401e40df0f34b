"""Shows the measured parity numbers of the passing tests of test_model.py at the end of every
`make test`, so the maxima (not only PASSED) are in CI's output without `-s`."""

_parity = []


def pytest_runtest_logreport(report):
    if report.when == 'call' and report.passed and 'test_model.py' in report.nodeid and report.capstdout.strip():
        _parity.append((report.nodeid.split('::')[-1], report.capstdout.strip()))


def pytest_terminal_summary(terminalreporter):
    if not _parity:
        return
    terminalreporter.section('parity with Hugging Face GPT-2 (measured, fp32)')
    for name, text in _parity:
        for line in text.splitlines():
            if line.strip():
                terminalreporter.write_line(f"{name}: {line.strip()}")
