"""The weekly retraining is really scheduled: the Prefect server started as `ituning serve` starts it
(cli/services.py; the session's `prefect_service`) creates the runs of deployment
retrain/retrain-weekly, Mondays 03:00 UTC (prefect.yaml), on its own. A schedule can show as active
while the server's scheduler fails on every loop (SQLAlchemy 2.1 with Prefect 3.8); only the runs it
creates show it works. Runs other tests start by hand from the deployment are not the scheduler's."""

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.harness import SESSION_STARTED

pytestmark = pytest.mark.slow
DEPLOYMENT = "retrain/retrain-weekly"
WEEK = timedelta(weeks=1)


def next_monday_3am(after: datetime) -> datetime:
    """The first Monday 03:00 UTC strictly after `after` (cron "0 3 * * 1", timezone UTC)."""
    day = after.astimezone(timezone.utc).replace(hour=3, minute=0, second=0, microsecond=0)
    day += timedelta(days=-day.weekday())  # this week's Monday
    while day <= after:
        day += WEEK
    return day


def scheduled_runs(api_url: str, deployment: str, wait_s: float = 300) -> list:
    """The deployment's runs that the scheduler created, once it has created some (polled: a busy machine is slow)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(api=api_url) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        deadline = time.monotonic() + wait_s
        while not (runs := scheduled(client.read_flow_runs(deployment_filter=only_this))) and time.monotonic() < deadline:
            time.sleep(2)
    return runs


def scheduled(runs: list) -> list:
    return [run for run in runs if run.auto_scheduled]


def test_a_deployment_records_where_to_find_the_code_not_this_machines_path(prefect_service):
    from prefect.client.orchestration import SyncPrefectClient

    settings = prefect_service
    with SyncPrefectClient(api=settings.prefect_api_url) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    recorded = json.dumps([deployment.pull_steps, deployment.path, deployment.job_variables])
    assert deployment.pull_steps == [{"flows.checkout.enter_checkout": {}}]
    assert str(Path(__file__).resolve().parents[1]) not in recorded


def test_the_server_schedules_weekly_retraining_on_mondays_at_3_utc(prefect_service):
    settings, started_at = prefect_service, SESSION_STARTED
    runs = scheduled_runs(settings.prefect_api_url, DEPLOYMENT)
    checked_at = datetime.now(timezone.utc)

    assert runs, f"the server created no run of {DEPLOYMENT}; see {settings.directory / 'prefect-server.log'}"
    assert {run.state.type.value for run in runs} == {"SCHEDULED"}
    starts = sorted(run.expected_start_time.astimezone(timezone.utc) for run in runs)
    assert len(starts) >= 3  # the scheduler keeps at least PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS ahead
    assert all(start.weekday() == 0 and (start.hour, start.minute, start.second) == (3, 0, 0) for start in starts)
    # weekly from the first Monday 03:00 after the scheduler ran, some time between these two
    assert next_monday_3am(started_at) <= starts[0] <= next_monday_3am(checked_at)
    assert [later - earlier for earlier, later in zip(starts, starts[1:])] == [WEEK] * (len(starts) - 1)
