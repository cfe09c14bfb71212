"""Prefect flows: they compose tasks (tasks/) into the pipeline's flows and deployments, and hold
what only Prefect needs (flow parameters, the in-process run of the full pipeline, the Prefect
server behind its host and origin guard). Only the command line (cli/) imports flows/; flows/ never
imports cli/.
"""

from flows.run_logs import carry_project_logs_into_runs

carry_project_logs_into_runs()
