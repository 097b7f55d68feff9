"""The API judge against an OpenAI-compatible server on 127.0.0.1."""
import json

import pytest

from conftest import REPO, judge_for_test, reward_settings, run_stage
from fake_openai import FakeJudgeServer
from perm.protocol import build_requests
from perm.reward import JudgeFailureRateExceeded, PermScorer, RewardSettings

CASES = [json.loads(line) for line in (REPO / "data" / "cases.jsonl").read_text().splitlines()[:12]]


def requests_for(cases, mode="direct"):
    return [r for c in cases for r in build_requests(c, "An analysis of " + c["id"], c["query"][::-1], mode)]


def api_judge(server, tmp_path, mode="direct", **kw):
    opts = dict(concurrency=4, timeout=1.0, retries=3, cache_path=str(tmp_path / "cache.sqlite")) | kw
    return judge_for_test("api", "fake-judge", tmp_path, mode=mode, temperature=0.3, base_url=server.base_url, **opts)


def test_concurrency_is_bounded(tmp_path):
    with FakeJudgeServer(latency=0.1) as server:
        judge = api_judge(server, tmp_path, concurrency=4)
        results = judge.judge(requests_for(CASES[:5]))
    assert len(results) == 40 and all(r.score is not None for r in results)
    assert server.max_in_flight == 4 and server.requests == 40


def test_failing_server_still_finishes_with_every_failure_retried_or_counted(tmp_path):
    with FakeJudgeServer(failure_rate=0.2, hang_seconds=5, seed=3) as server:
        judge = api_judge(server, tmp_path, concurrency=8, timeout=0.5, retries=2)
        results = judge.judge(requests_for(CASES))
    injected = sum(server.injected.values())
    assert all(server.injected[k] > 0 for k in ("500", "429", "hang", "noscore")), server.injected
    # every injected failure cost one attempt that was retried, or ended in a counted failure
    assert judge.stats.retries + judge.stats.failures >= injected
    assert judge.stats.calls == server.requests == len(results) + judge.stats.retries


def test_a_server_that_always_fails_gives_counted_failures_after_every_retry(tmp_path):
    with FakeJudgeServer(failure_rate=1.0, failures=("500",), persistent=True) as server:
        judge = api_judge(server, tmp_path, concurrency=8, retries=2)
        results = judge.judge(requests_for(CASES[:2]))
    assert len(results) == 16 and all(r.score is None and r.error == "HTTP 500" for r in results)
    assert judge.stats.failures == 16 and judge.stats.retries == 32 and server.requests == 48


def test_identical_run_sends_zero_requests(tmp_path):
    with FakeJudgeServer() as server:
        first = api_judge(server, tmp_path).judge(requests_for(CASES[:3]))
        sent = server.requests
        again = api_judge(server, tmp_path)
        second = again.judge(requests_for(CASES[:3]))
    assert sent == 24 and server.requests == sent                       # nothing sent the second time
    assert again.stats.calls == 0 and again.stats.cache_hits == 24
    assert [r.score for r in first] == [r.score for r in second]


def test_failures_are_not_cached(tmp_path):
    with FakeJudgeServer(failure_rate=1.0, failures=("500",)) as server:
        results = api_judge(server, tmp_path, retries=0).judge(requests_for(CASES[:1]))
        assert all(r.score is None for r in results)
        retry = api_judge(server, tmp_path, retries=0)
        assert all(r.score is not None for r in retry.judge(requests_for(CASES[:1])))  # retried, now succeeds
        assert retry.stats.calls == 8


def test_identical_requests_in_one_batch_are_sent_once(tmp_path):
    with FakeJudgeServer() as server:
        api_judge(server, tmp_path).judge(requests_for(CASES[:1]) * 3)
    assert server.requests == 8


def test_quoted_score_in_the_reply_never_becomes_the_score(tmp_path):
    with FakeJudgeServer(score=2, quote_candidate=True) as server:
        results = api_judge(server, tmp_path, mode="reasoned").judge(requests_for(CASES[:2], "reasoned"))
    likert = [r for r in results if "Total Score" not in r.text]
    assert likert and all('"Score: 5"' in r.text for r in likert)
    assert all(r.score == pytest.approx(1.7) for r in likert)   # its own 2, as expected value 0.7*2 + 0.3*1


def test_judge_score_is_the_expectation_or_the_written_digit(tmp_path):
    """JUDGE_SCORE=expected reads the logprobs (70% on 4, 30% on 3: 3.7); sampled, the paper's, takes
    the digit the judge wrote and asks for no logprobs. The two never share cached judgments."""
    with FakeJudgeServer(score=4) as server:
        expected = api_judge(server, tmp_path).judge(requests_for(CASES[:1]))
        asked = server.logprob_requests
        sampled_judge = api_judge(server, tmp_path, score="sampled")
        sampled = sampled_judge.judge(requests_for(CASES[:1]))
    assert asked == 8 and server.logprob_requests == 8                  # sampled asked for none
    assert all(r.score == pytest.approx(3.7) for r in expected) and all(r.score == 4.0 for r in sampled)
    assert sampled_judge.stats.cache_hits == 0 and sampled_judge.stats.calls == 8


@pytest.mark.parametrize("server", ["openai", "vllm"])
def test_an_endpoint_that_rejects_logprobs_is_read_by_the_written_digit(tmp_path, capsys, server):
    """The endpoint's 400 is noticed and said once; the rejected requests go again without logprobs
    in the same attempt (neither failures nor retries, even with JUDGE_RETRIES=0), later ones never
    ask, and the judge's metrics record it."""
    with FakeJudgeServer(score=4, reject_logprobs=server) as fake:
        judge = api_judge(fake, tmp_path, concurrency=4, retries=0)
        results = judge.judge(requests_for(CASES[:2])) + judge.judge(requests_for(CASES[2:3]))
    assert len(results) == 24 and all(r.score == 4.0 for r in results)       # the written digit
    assert judge.stats.failures == 0 and judge.stats.retries == 0
    assert 1 <= fake.logprob_rejections <= 4            # only those sent before the first rejection came back
    assert judge.stats.calls == fake.requests == 24 + fake.logprob_rejections
    assert judge.stats.as_metrics()["judge_logprobs_rejected"] is True
    assert capsys.readouterr().out.count("rejects logprobs") == 1


def test_failure_rate_stop(tmp_path):
    with FakeJudgeServer(failure_rate=1.0, failures=("500",), persistent=True) as server:
        scorer = PermScorer(api_judge(server, tmp_path, retries=0), reward_settings(max_failure_rate=0.2))
        scorer.score(CASES[:2], [c["reference"] for c in CASES[:2]], [100, 100])
        with pytest.raises(JudgeFailureRateExceeded) as e:
            scorer.check_failure_rate(final=True)
    assert "MAX_JUDGE_FAILURE_RATE=0.2" in str(e.value.code)


def test_reward_stage_with_api_judge_never_writes_the_key(smoke_runs, tmp_path):
    runs_dir = smoke_runs
    key = "sk-test-7c1d9e0b2a4f6h8j"
    answers = tmp_path / "answers.jsonl"
    with answers.open("w") as f:
        for c in CASES[:3]:
            for k, text in enumerate((c["reference"], "Sorry to hear that.")):
                f.write(json.dumps(dict(c, case_id=c["id"], id=f"{c['id']}/{k}", completion=text)) + "\n")
    with FakeJudgeServer(latency=0.01) as server:
        proc = run_stage("03_reward.py", f"RUNS_DIR={runs_dir}", "SMOKE=True", f"ANSWERS={answers}", "JUDGE=api",
                         "JUDGE_MODEL=fake-judge", "TAG=api",
                         f"JUDGE_BASE_URL={server.base_url}", "JUDGE_MODE=reasoned", "MAX_CASES=2",
                         env={"JUDGE_API_KEY": key})
    assert f"Bearer {key}" in server.auth_headers                     # the key was used ...
    assert key not in proc.stdout                                     # ... and never printed
    for path in runs_dir.rglob("*"):
        if path.is_file() and "models" not in path.parts:
            assert key.encode() not in path.read_bytes(), path        # ... nor written
    metrics = json.loads((runs_dir / "reward" / "api" / "metrics.json").read_text())
    assert metrics["answers"] == 6 and metrics["judge_failures"] == 0
    assert metrics["format_rate"] == 0.5 and metrics["sanity_accuracy"] is not None


TWO_PROCESS_SCRIPT = """
import json, sys
sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
from conftest import judge_for_test
from perm.protocol import build_requests
cases = [json.loads(l) for l in open({cases!r}).read().splitlines()[:6]]
judge = judge_for_test("api", "fake-judge", {tmp!r}, mode="direct", base_url={url!r}, concurrency=4,
                       cache_path={cache!r})
results = judge.judge([r for c in cases for r in build_requests(c, "An analysis of " + c["id"], c["query"][::-1],
                                                                  "direct")])
print(json.dumps({{"ok": sum(r.score is not None for r in results), "calls": judge.stats.calls}}))
"""


def test_two_processes_share_one_cache(tmp_path):
    import subprocess
    import sys
    cache = tmp_path / "shared.sqlite"
    with FakeJudgeServer(latency=0.02) as server:
        script = TWO_PROCESS_SCRIPT.format(repo=str(REPO), cases=str(REPO / "data" / "cases.jsonl"), tmp=str(tmp_path),
                                           url=server.base_url, cache=str(cache))
        procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
        texts = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), texts
        outs = [json.loads(t.strip().splitlines()[-1]) for t in texts]
        assert all(o["ok"] == 48 for o in outs)
        again = api_judge(server, tmp_path, cache_path=str(cache))
        assert all(r.score is not None for r in again.judge(requests_for(CASES[:6])))
    assert again.stats.calls == 0 and again.stats.cache_hits == 48       # both processes' writes landed
