"""async_wait through ansible-playbook with real async jobs (no lab needed)."""

from ansible_runner import playbook


def test_whichever_job_ends_first_is_returned(tmp_path):
    proc = playbook("async_wait.yml", dict(flag=str(tmp_path / "flag")))
    assert "failed=0" in proc.stdout and "ok=" in proc.stdout
    assert proc.stdout.count("TASK [Both finished well]") == 1
