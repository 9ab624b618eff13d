"""The fine-tuning API's routes, shaped like OpenAI's: files (`/v1/files`) and jobs
(`/v1/fine_tuning/jobs`).

Every route needs a key with the `jobs` scope, and sees only its key's project: another
project's ids answer 404, as ids that do not exist do. An upload is checked by our loaders,
record by record, before it is kept; a bad file is refused with its line and the fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import func, select

from ftservice import storage
from ftservice.artifacts import CARD, LOSS_PLOT, META, load_artifact, publish
from ftservice.config import JobSpec, SpecError, spec_from_dict
from ftservice.data.loaders import DataError, check_files
from ftservice.errors import FtserviceError
from ftservice.jobs import connect, entrypoint
from ftservice.memory import GiB, plan_for_spec
from ftservice.serve.api import api
from ftservice.serve.finetune_spec import CreateJob, artifact_name, batch_settings, overrides
from ftservice.serve.protocol import ApiError
from ftservice.store.models import FineTuneJob, JobEvent, StoredFile
from ftservice.train.common import EVENTS
from ftservice.train.driver import check_data, held_checkpoints, run_name

log = logging.getLogger("ftservice.serve")

PURPOSES = ("fine-tune",)
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # what our loaders read
_SAFE = str.maketrans({c: "_" for c in "/\\\0:"})
MULTIPART_SLACK = 64 << 10  # a multipart body's boundaries and fields around the file


def file_object(row: StoredFile) -> dict:
    """OpenAI's file object, with what our loaders found (`ftservice`)."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at.timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
        "ftservice": {"format": row.format, "records": row.records, "kinds": row.kinds},
    }


def page(objects: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page over objects in their listed order: those after `after`."""
    if after is not None:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(after) + 1 :] if after in ids else []
    shown = objects[:limit]
    return {
        "object": "list",
        "data": shown,
        "has_more": len(objects) > limit,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
    }


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ApiError(400, f"limit must be an integer from 1 to {most}", param="limit")
    return value


def check_upload(folder: Path, name: str) -> dict:
    """Our loaders over every record of an uploaded file; DataError names the upload's own
    name (not where it was put) with the line."""
    try:
        [summary] = check_files([str(folder / name)])
    except DataError as e:
        raise DataError(str(e).replace(str(folder / name), name)) from None
    return summary


class FineTuneRoutes:
    """The fine-tuning API's routes; mixed into the ingress (self.store, self.spec,
    self.caller)."""

    def not_found(self, kind: str, ident: str) -> ApiError:
        return ApiError(404, f"no {kind} '{ident}' in this project", code="not_found")

    def project_file(self, project: str, file_id: str) -> StoredFile:
        with self.store() as session:
            row = session.get(StoredFile, file_id)
        if row is None or row.project != project:
            raise self.not_found("file", file_id)
        return row

    @api.post("/v1/files")
    async def upload_file(self, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        cap = self.spec.jobs.max_file_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > cap + MULTIPART_SLACK:
            raise self.too_large(declared, cap)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:  # Starlette's multipart parser: a body that is not a form
            raise ApiError(
                400, f"send multipart/form-data with 'file' and 'purpose' ({e})"
            ) from None
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose not in PURPOSES:
            raise ApiError(
                400, f"purpose '{purpose}' is not supported; use {', '.join(PURPOSES)}",
                param="purpose",
            )  # fmt: skip
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "no file in the form: send it as the 'file' part", param="file")
        name = (upload.filename or "upload.jsonl").translate(_SAFE).strip(". ")[:200]
        if not name.lower().endswith(SUFFIXES):
            raise ApiError(
                400, f"{name}: a training file is one of {', '.join(SUFFIXES)}", param="file"
            )
        data = await upload.read()
        if len(data) > cap:
            raise self.too_large(len(data), cap)
        if not data:
            raise ApiError(400, f"{name} is empty; it needs at least one record", param="file")
        self.check_project_space(caller.project, len(data))
        file_id = "file-" + secrets.token_hex(12)
        staging = Path(tempfile.mkdtemp(prefix="ftservice-upload-"))
        try:
            (staging / name).write_bytes(data)
            try:
                summary = await asyncio.to_thread(check_upload, staging, name)
            except DataError as e:
                raise ApiError(400, str(e), param="file", code="invalid_file") from None
            location = storage.join(self.spec.jobs.storage, "files", caller.project, file_id)
            local = storage.local_path(location)
            if local is not None:
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staging, local)
            else:
                storage.upload(staging, location)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        row = StoredFile(
            id=file_id, project=caller.project, filename=name, purpose=purpose,
            bytes=len(data), location=storage.join(location, name), format=summary["format"],
            records=summary["records"], kinds=summary["kinds"], created_at=datetime.now(UTC),
        )  # fmt: skip
        with self.store.begin() as session:
            session.add(row)
        return file_object(row)

    def too_large(self, size: int, cap: int) -> ApiError:
        return ApiError(
            413, f"the file is {size} bytes, over the limit of {cap} (jobs.max_file_bytes)",
            param="file", code="file_too_large",
        )  # fmt: skip

    def check_project_space(self, project: str, adding: int) -> None:
        with self.store() as session:
            kept = session.scalar(
                select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
                    StoredFile.project == project
                )
            )
        cap = self.spec.jobs.max_project_bytes
        if kept + adding > cap:
            raise ApiError(
                413,
                f"project '{project}' keeps {kept} bytes of files and this one adds {adding}, "
                f"over its limit of {cap} (jobs.max_project_bytes); delete files it no longer "
                "needs",
                param="file", code="project_storage_full",
            )  # fmt: skip

    @api.get("/v1/files")
    async def list_files(self, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be asc or desc", param="order")
        query = select(StoredFile).where(StoredFile.project == caller.project)
        if purpose := request.query_params.get("purpose"):
            query = query.where(StoredFile.purpose == purpose)
        keys = (StoredFile.created_at, StoredFile.id)
        query = query.order_by(*(k.desc() if order == "desc" else k.asc() for k in keys))
        with self.store() as session:
            rows = session.scalars(query).all()
        objects = [file_object(r) for r in rows]
        return page(objects, request.query_params.get("after"), _limit(request, 10000, 10000))

    @api.get("/v1/files/{file_id}")
    async def get_file(self, file_id: str, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        return file_object(self.project_file(caller.project, file_id))

    @api.get("/v1/files/{file_id}/content")
    async def file_content(self, file_id: str, request: Request) -> Response:
        caller = self.caller(request, "jobs")
        row = self.project_file(caller.project, file_id)
        data = await asyncio.to_thread(lambda: storage.localize(row.location).read_bytes())
        return Response(data, media_type="application/octet-stream")

    @api.delete("/v1/files/{file_id}")
    async def delete_file(self, file_id: str, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        row = self.project_file(caller.project, file_id)
        with self.store() as session:
            using = session.scalars(
                select(FineTuneJob).where(
                    FineTuneJob.project == caller.project,
                    FineTuneJob.status.in_((*ACTIVE, "paused")),
                    (FineTuneJob.training_file == file_id)
                    | (FineTuneJob.validation_file == file_id),
                )
            ).first()
        if using is not None:  # its run reads the file (again, when it resumes)
            raise ApiError(
                409, f"file {file_id} is used by job {using.id} ({using.status}); cancel the "
                "job or wait for it to end, then delete the file", code="file_in_use",
            )  # fmt: skip
        with self.store.begin() as session:
            session.delete(session.get(StoredFile, file_id))
        storage.remove_tree(row.location.rsplit("/", 1)[0])
        return {"id": file_id, "object": "file", "deleted": True}


# ---- jobs -----------------------------------------------------------------------------------

ACTIVE = ("validating_files", "queued", "running")
HISTORY_FILE = "log_history.json"  # an artifact's logged steps
FINAL = ("succeeded", "failed", "cancelled")
RAY_STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded",
              "FAILED": "failed", "STOPPED": "cancelled"}  # fmt: skip


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(at: datetime | None) -> int | None:
    return int(at.replace(tzinfo=at.tzinfo or UTC).timestamp()) if at else None


def job_object(row: FineTuneJob) -> dict:
    """OpenAI's fine-tuning job object (and what ours adds, under `ftservice`)."""
    method = json.loads(row.method)
    hyper = method[method["type"]]["hyperparameters"]
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": _seconds(row.created_at),
        "finished_at": _seconds(row.finished_at),
        "model": row.model,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.project,
        "status": row.status,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "hyperparameters": {k: v for k, v in hyper.items() if k != "beta"},
        "method": method,
        "result_files": [],
        "trained_tokens": row.trained_tokens,
        "error": json.loads(row.error) if row.error else None,
        "seed": row.seed,
        "suffix": row.suffix,
        "metadata": json.loads(row.job_metadata) or None,
        "integrations": [],
        "estimated_finish": None,
        "ftservice": {"run": row.run, "submission": row.submission, "attempts": row.attempts},
    }


def logged_steps(run: str) -> list[dict]:
    """The run's logged steps as it logged them (the worker's events file), the last log of
    each step kept (a resumed run logs again the steps after its checkpoint)."""
    location = storage.join(run, EVENTS)
    try:
        text = storage.read_text(location) if storage.is_file(location) else ""
    except (FileNotFoundError, storage.StorageError):
        text = ""  # a store's object replaced while read: the next read has it
    by_key: dict[tuple, dict] = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            by_key[(row["step"], "loss" in row)] = row
    return sorted(by_key.values(), key=lambda r: (r["step"], r["time"]))


def trained_tokens(logs: list[dict]) -> int | None:
    counts = [h["num_tokens"] for h in logs if "num_tokens" in h]
    return int(max(counts)) if counts else None


class JobRoutes:
    """`/v1/fine_tuning/jobs`: each job a Ray Job running `ftservice train` on the resolved
    spec, its state in the store and refreshed from Ray Jobs when read."""

    def ray_jobs(self):
        client = getattr(self, "_ray_jobs", None)
        if client is None:
            address = self.spec.jobs.ray_address or dashboard_address()
            client = self._ray_jobs = connect(address)
        return client

    def project_job(self, project: str, job_id: str) -> FineTuneJob:
        with self.store() as session:
            row = session.get(FineTuneJob, job_id)
        if row is None or row.project != project:
            raise self.not_found("fine-tuning job", job_id)
        return self.refresh(row)

    def event(self, job_id: str, message: str, level: str = "info") -> None:
        with self.store.begin() as session:
            session.add(JobEvent(job=job_id, level=level, message=message, created_at=_now()))

    def refresh(self, row: FineTuneJob) -> FineTuneJob:
        """The job's status from its Ray Job; on the way to an end, what it left."""
        if row.status not in ACTIVE or row.submission is None:
            return row
        try:
            info = self.ray_jobs().get_job_info(row.submission)
        except Exception as e:  # the cluster is away: say what was last known
            log.warning("fine-tuning job %s: Ray Jobs unreachable (%s)", row.id, e)
            return row
        status = RAY_STATUS.get(str(getattr(info.status, "value", info.status)), row.status)
        if status == "cancelled" and row.wanted == "paused":
            status = "paused"
        if status == row.status:
            return row
        changes: dict = {"status": status}
        if status in FINAL:
            changes["finished_at"] = _now()
        spec = JobSpec.model_validate(json.loads(row.spec))
        if status == "succeeded":
            location = storage.join(spec.output.registry, spec.name)
            if storage.exists(location):
                artifact = load_artifact(location)
                history = json.loads(storage.read_text(storage.join(location, HISTORY_FILE)))
                changes["fine_tuned_model"] = artifact.name
                changes["trained_tokens"] = trained_tokens(history)
                for name in publish_checkpoints(artifact, history, row.run):
                    self.event(row.id, f"checkpoint published as {name}, servable now")
            else:
                status = changes["status"] = "failed"
                changes["error"] = json.dumps({"code": "not_published", "param": None,
                    "message": f"the run ended without publishing {spec.name}"})  # fmt: skip
        if status == "failed" and "error" not in changes:
            changes["error"] = json.dumps(
                {"code": "training_failed", "param": None, "message": self.failure(row, info)}
            )
        with self.store.begin() as session:
            job = session.get(FineTuneJob, row.id)
            for key, value in changes.items():
                setattr(job, key, value)
            session.add(JobEvent(job=row.id, level="error" if status == "failed" else "info",
                                 message=f"status: {status}", created_at=_now()))  # fmt: skip
        return self._row(row.id)

    def failure(self, row: FineTuneJob, info) -> str:
        """Why a job failed: the error its training printed last (our errors are one line
        that says what and how to fix), else Ray's message."""
        try:
            text = self.ray_jobs().get_job_logs(row.submission)
        except Exception:
            text = ""
        lines = [x.strip() for x in text.splitlines() if x.strip().startswith("error: ")]
        return lines[-1].removeprefix("error: ") if lines else (info.message or "failed")

    @api.post("/v1/fine_tuning/jobs")
    async def create_job(self, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        req = await self.body(request, CreateJob)
        with self.store() as session:
            running = session.scalar(
                select(func.count()).select_from(FineTuneJob).where(
                    FineTuneJob.project == caller.project, FineTuneJob.status.in_(ACTIVE))
            )  # fmt: skip
        if running >= self.spec.jobs.max_concurrent_jobs:
            raise ApiError(
                429,
                f"project '{caller.project}' has {running} jobs queued or running, its limit "
                "(jobs.max_concurrent_jobs); wait for one to end or cancel one",
                "rate_limit_exceeded", "too_many_jobs",
            )  # fmt: skip
        job_id = "ftjob-" + secrets.token_hex(12)
        spec = await asyncio.to_thread(self.resolve_job, caller.project, req, job_id)
        folder = storage.join(self.spec.jobs.storage, "specs", caller.project)
        spec_location = storage.join(folder, f"{job_id}.json")
        if (local := storage.local_path(folder)) is not None:
            local.mkdir(parents=True, exist_ok=True)
        storage.write_text(spec_location, json.dumps(spec.model_dump(mode="json"), indent=1))
        hyper = req.hyper()
        method = {"type": req.method.type, req.method.type: {"hyperparameters": {
            "n_epochs": spec.train.epochs if hyper.n_epochs in (None, "auto")
            else hyper.n_epochs,
            "batch_size": self.global_batch(spec),
            "learning_rate_multiplier": hyper.learning_rate_multiplier
            if hyper.learning_rate_multiplier not in (None, "auto") else 1.0,
            **({"beta": spec.dpo.beta} if req.method.type == "dpo" else {}),
        }}}  # fmt: skip
        row = FineTuneJob(
            id=job_id, project=caller.project, model=req.model,
            training_file=req.training_file, validation_file=req.validation_file,
            method=json.dumps(method), suffix=req.suffix, seed=spec.train.seed,
            job_metadata=json.dumps(req.metadata or {}),
            spec=json.dumps(spec.model_dump(mode="json")), spec_location=spec_location,
            run=storage.join(spec.output.storage_path, run_name(spec)),
            status="validating_files", attempts=0, created_at=_now(),
        )  # fmt: skip
        with self.store.begin() as session:
            session.add(row)
        self.event(job_id, f"created: {spec.method} {spec.stage} of {req.model}")
        return job_object(await asyncio.to_thread(self.start, row))

    def global_batch(self, spec: JobSpec) -> int:
        t = spec.train
        return t.micro_batch_size * t.gradient_accumulation_steps * max(spec.scaling.num_workers, 1)

    def start(self, row: FineTuneJob) -> FineTuneJob:
        """Submit the job's next attempt as a Ray Job (`ftservice train` on its spec, the
        entrypoint `ftservice submit` uses; our own path in it, nothing from the request)."""
        attempt = row.attempts + 1
        submission = f"ftservice-{row.id}" + (f"-{attempt}" if attempt > 1 else "")
        try:
            self.submit(row, submission)
        except Exception as e:
            with self.store.begin() as session:
                job = session.get(FineTuneJob, row.id)
                job.status, job.finished_at = "failed", _now()
                job.error = json.dumps({"code": "not_submitted", "param": None,
                                        "message": f"Ray Jobs refused the job: {e}"})  # fmt: skip
            self.event(row.id, f"Ray Jobs refused the job: {e}", "error")
            return self._row(row.id)
        with self.store.begin() as session:
            job = session.get(FineTuneJob, row.id)
            job.status, job.submission, job.attempts = "queued", submission, attempt
            job.wanted = None
        self.event(row.id, f"queued as Ray Job {submission}")
        return self._row(row.id)

    def python(self) -> str:
        """The interpreter a job runs: this replica's own when jobs run on the app's cluster
        (its image, or the venv that started the embedded Ray, whose PATH need not have it);
        the other cluster's `python` when `jobs.ray_address` names one."""
        return "python" if self.spec.jobs.ray_address else sys.executable

    def submit(self, row: FineTuneJob, submission: str, patience_s: float = 60) -> None:
        """Submit to Ray Jobs; a head whose job agent is not up yet (it says "try again
        later") is asked again for up to `patience_s`."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                self.ray_jobs().submit_job(
                    entrypoint=entrypoint(row.spec_location, [], self.python()),
                    submission_id=submission,
                    metadata={"ftservice.job": row.id, "ftservice.project": row.project},
                )  # fmt: skip
                return
            except RuntimeError as e:
                if "try again later" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def resolve_job(self, project: str, req: CreateJob, job_id: str) -> JobSpec:
        """The job spec a request becomes, checked as `ftservice train` checks it, and
        planned: a job that cannot fit is refused with the plan's reason and advice."""
        files = {}
        for param, file_id in (("training_file", req.training_file),
                               ("validation_file", req.validation_file)):  # fmt: skip
            if file_id is None:
                continue
            with self.store() as session:
                found = session.get(StoredFile, file_id)
            if found is None or found.project != project:
                raise ApiError(400, f"{param} '{file_id}': no such file in this project",
                               param=param, code="file_not_found")  # fmt: skip
            files[param] = found.location
        stage = "dpo" if req.method.type == "dpo" else "sft"
        data: dict = {"train": [files["training_file"]]}
        if "validation_file" in files:
            data["eval"] = [files["validation_file"]]
        base = {
            "name": artifact_name(req.suffix, job_id),
            "stage": stage,
            "model": self.spec.model.model_dump(mode="json", exclude_none=True),
            "data": data,
            "eval": {"domain": None, "general": None},
            "output": {"registry": self.spec.registries[0], "keep_checkpoints": True,
                       "storage_path": storage.join(self.spec.jobs.storage, "runs")},
        }  # fmt: skip
        adapter = None if req.model == self.base_name else self.served_adapter(req.model)
        if adapter is not None:
            if stage != "dpo":
                raise ApiError(
                    400,
                    f"model '{req.model}' is a fine-tuned model: supervised jobs start from the "
                    f"base '{self.base_name}'; DPO jobs may start from a fine-tuned model",
                    param="model", code="model_not_available",
                )  # fmt: skip
            base["dpo"] = {"parent": adapter}
        hyper = req.hyper()
        settings = overrides(self.spec.jobs.defaults, "jobs.defaults") + overrides(
            req.ftservice, "ftservice"
        )
        if req.seed is not None:
            settings.append(f"train.seed={req.seed}")
        if hyper.n_epochs not in (None, "auto"):
            settings.append(f"train.epochs={hyper.n_epochs}")
        if hyper.beta not in (None, "auto"):
            settings.append(f"dpo.beta={hyper.beta}")
        spec = self.checked_spec(base, settings)
        extra = []
        if hyper.batch_size not in (None, "auto"):
            batch = batch_settings(hyper.batch_size, max(spec.scaling.num_workers, 1),
                                   spec.train.micro_batch_size)  # fmt: skip
            extra += [f"train.{k}={v}" for k, v in batch.items()]
        if hyper.learning_rate_multiplier not in (None, "auto"):
            lr = spec.train.learning_rate * hyper.learning_rate_multiplier
            extra.append(f"train.learning_rate={lr!r}")
        if extra:
            spec = self.checked_spec(base, settings + extra)
        planned = plan_for_spec(spec)
        if planned.fits is False:
            advice = "; ".join(
                ", ".join(f"{k}={json.dumps(v)}" for k, v in a["changes"].items())
                for a in planned.advice[:3]
            )
            raise ApiError(
                400,
                f"this job does not fit: it needs {planned.peak_bytes / GiB:.1f} GiB per device "
                f"and a device has {planned.device_bytes / GiB:.1f} GiB"
                + (f"; what fits (set in ftservice): {advice}" if advice else ""),
                param="ftservice", code="does_not_fit",
            )  # fmt: skip
        return spec

    def checked_spec(self, base: dict, settings: list[str]) -> JobSpec:
        try:
            spec = spec_from_dict(json.loads(json.dumps(base)), "the job", None, settings)
            check_data(spec)
            return spec
        except SpecError as e:
            message = "; ".join(f"{p.path}: {p.message}" if p.path else p.message
                                for p in e.problems)  # fmt: skip
            raise ApiError(400, message, param=e.problems[0].path, code="invalid_job") from None
        except FtserviceError as e:  # the data does not suit the method (check_data)
            raise ApiError(400, str(e), param="training_file", code="invalid_file") from None

    def served_adapter(self, model: str) -> str:
        """The artifact location of a fine-tuned model this app serves (a DPO parent)."""
        name = self.resolve(model)
        for registry in self.spec.registries:
            location = storage.join(registry, name)
            if storage.exists(location):
                return location
        raise ApiError(404, f"the model '{model}' does not exist", param="model",
                       code="model_not_found")  # fmt: skip

    @api.get("/v1/fine_tuning/jobs")
    async def list_jobs(self, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        query = (select(FineTuneJob).where(FineTuneJob.project == caller.project)
                 .order_by(FineTuneJob.created_at.desc(), FineTuneJob.id.desc()))  # fmt: skip
        with self.store() as session:
            rows = session.scalars(query).all()
        by_id = {r.id: r for r in rows}
        shown = page([{"id": r.id} for r in rows], request.query_params.get("after"),
                     _limit(request, 20, 100))  # fmt: skip
        shown["data"] = [job_object(await asyncio.to_thread(self.refresh, by_id[o["id"]]))
                         for o in shown["data"]]  # fmt: skip
        return shown

    def _row(self, job_id: str) -> FineTuneJob:
        with self.store() as session:
            return session.get(FineTuneJob, job_id)

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        row = await asyncio.to_thread(self.project_job, caller.project, job_id)
        return job_object(row)

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(self, job_id: str, request: Request) -> dict:
        return job_object(await self.stop_job(request, job_id, "cancelled"))

    @api.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(self, job_id: str, request: Request) -> dict:
        return job_object(await self.stop_job(request, job_id, "paused"))

    async def stop_job(self, request: Request, job_id: str, wanted: str) -> FineTuneJob:
        """Stop the job's Ray Job (cancelled: for good; paused: its checkpoints stay, and
        resume continues from the last). Nothing is published by a stopped run."""
        caller = self.caller(request, "jobs")
        row = await asyncio.to_thread(self.project_job, caller.project, job_id)
        if row.status not in ACTIVE and not (wanted == "cancelled" and row.status == "paused"):
            raise ApiError(
                409, f"job {job_id} is {row.status}; only a queued or running job can be "
                f"{'paused' if wanted == 'paused' else 'cancelled'}", code="invalid_state",
            )  # fmt: skip
        if row.status == "paused":  # a paused job has no Ray Job left to stop
            with self.store.begin() as session:
                job = session.get(FineTuneJob, job_id)
                job.status, job.finished_at = "cancelled", _now()
            self.event(job_id, "status: cancelled")
            return self._row(job_id)
        with self.store.begin() as session:
            session.get(FineTuneJob, job_id).wanted = wanted
        await asyncio.to_thread(self.ray_jobs().stop_job, row.submission)
        self.event(job_id, f"{wanted[:-2]} requested: stopping Ray Job {row.submission}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = await asyncio.to_thread(self.refresh, self._row(job_id))
            if row.status not in ACTIVE:
                return row
            await asyncio.sleep(0.5)
        return row

    @api.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(self, job_id: str, request: Request) -> dict:
        caller = self.caller(request, "jobs")
        row = await asyncio.to_thread(self.project_job, caller.project, job_id)
        if row.status != "paused":
            raise ApiError(409, f"job {job_id} is {row.status}; only a paused job resumes",
                           code="invalid_state")  # fmt: skip
        self.event(job_id, "resumed: continues from its last checkpoint")
        return job_object(await asyncio.to_thread(self.start, row))

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(self, job_id: str, request: Request) -> dict:
        """Status changes and messages, and each logged step (loss, learning rate, ...) as
        the run logged it; newest first."""
        caller = self.caller(request, "jobs")
        row = await asyncio.to_thread(self.project_job, caller.project, job_id)
        with self.store() as session:
            stored = session.scalars(select(JobEvent).where(JobEvent.job == job_id)).all()
        events = [{"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event",
                   "created_at": _seconds(e.created_at), "level": e.level,
                   "message": e.message, "type": "message", "data": None,
                   "_at": e.created_at.replace(tzinfo=e.created_at.tzinfo or UTC).timestamp()}
                  for e in stored]  # fmt: skip
        for log in await asyncio.to_thread(logged_steps, row.run):
            data = {k: v for k, v in log.items() if k != "time"}
            what = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in data.items() if k != "step")  # fmt: skip
            kind = "loss" if "loss" in log else "log"
            events.append({"id": f"ftevent-{job_id[6:]}-{kind}-{log['step']}",
                           "object": "fine_tuning.job.event", "created_at": int(log["time"]),
                           "level": "info", "message": f"step {log['step']}: {what}",
                           "type": "metrics", "data": data, "_at": log["time"]})  # fmt: skip
        events.sort(key=lambda e: e.pop("_at"), reverse=True)
        return page(events, request.query_params.get("after"), _limit(request, 20, 1000))

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(self, job_id: str, request: Request) -> dict:
        """The run's kept checkpoints, newest first. Once the job succeeded each is a model
        of its own in the registry, servable by name (the last one is the job's model);
        before, they are the run's, and `ftservice.servable` says no."""
        caller = self.caller(request, "jobs")
        row = await asyncio.to_thread(self.project_job, caller.project, job_id)
        spec = JobSpec.model_validate(json.loads(row.spec))
        found = []
        for kept in await asyncio.to_thread(checkpoint_states, row.run):
            step = kept.state["global_step"]
            history = kept.state["log_history"]
            losses = [h for h in history if "loss" in h and h.get("step") == step]
            metrics = {"step": step, **({"train_loss": losses[-1]["loss"]} if losses else {})}
            name = checkpoint_name(spec.name, step)
            if row.fine_tuned_model and step == kept.state.get("max_steps"):
                name = row.fine_tuned_model
            servable = storage.exists(storage.join(spec.output.registry, name))
            found.append({
                "id": f"ftckpt-{job_id[6:]}-{step}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(kept.modified), "fine_tuning_job_id": job_id,
                "step_number": step, "metrics": metrics, "fine_tuned_model_checkpoint": name,
                "ftservice": {"servable": servable},
            })  # fmt: skip
        found.sort(key=lambda c: c["step_number"], reverse=True)
        return page(found, request.query_params.get("after"), _limit(request, 10, 100))


def checkpoint_name(name: str, step: int) -> str:
    return f"{name}-step-{step}"


@dataclass(frozen=True)
class KeptCheckpoint:
    folder: str
    """The checkpoint's folder (the trainer's, inside Ray Train's `checkpoint_*`)."""
    state: dict
    """Its trainer_state.json."""
    modified: float


def checkpoint_states(run: str) -> list[KeptCheckpoint]:
    """Each checkpoint a run keeps (Ray Train's folders, local or in a store), by step:
    only those Ray Train holds, since a paused job resumes from them and from no other."""
    found = []
    held = held_checkpoints(run)
    for name in storage.list_dirs(run):
        if name not in held:
            continue
        for inner in storage.list_dirs(storage.join(run, name)):
            folder = storage.join(run, name, inner)
            state = storage.join(folder, "trainer_state.json")
            if storage.is_file(state):
                saved = json.loads(storage.read_text(state))
                found.append(KeptCheckpoint(folder, saved, storage.modified(state)))
    return sorted(found, key=lambda c: c.state["global_step"])


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
NOT_TOKENIZER = {*ADAPTER_FILES, META, CARD, LOSS_PLOT, HISTORY_FILE}


def publish_checkpoints(final, history: list[dict], run: str) -> list[str]:
    """Each kept checkpoint of a finished adapter run before its last step, published as an
    artifact of its own (`<name>-step-<N>`: the adapter's weights then, the final artifact's
    tokenizer and lineage), so it is servable by name as the job's model is."""
    spec = final.meta.spec
    if spec["method"] not in ("lora", "qlora"):
        return []  # a full model per checkpoint is too big to keep as a model of its own
    names = []
    registry = spec["output"]["registry"]
    for kept in checkpoint_states(run):
        step = kept.state["global_step"]
        name = checkpoint_name(spec["name"], step)
        if step == final.meta.metrics.get("global_step") or storage.exists(
            storage.join(registry, name)
        ):
            continue
        with tempfile.TemporaryDirectory(prefix="ftservice-ckpt-") as tmp:
            for item in ADAPTER_FILES:
                shutil.copy2(storage.localize(storage.join(kept.folder, item)), Path(tmp) / item)
            for item in final.path.iterdir():
                if item.is_file() and item.name not in NOT_TOKENIZER:
                    shutil.copy2(item, Path(tmp) / item.name)
            meta = final.meta
            published = publish(
                registry, name, Path(tmp), spec=spec, run_name=meta.run_name,
                base_model=meta.base_model, dataset_fingerprint=meta.dataset_fingerprint,
                data=meta.data, metrics={"global_step": step, "checkpoint_of": meta.name},
                log_history=[h for h in history if h.get("step", 0) <= step],
                parent=meta.parent,
            )  # fmt: skip
        names.append(published.name)
    return names


def dashboard_address() -> str:
    """The Jobs API of the cluster this process runs in: the dashboard's address, which
    Ray keeps in its internal key-value store."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    url = _internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    )
    if not url:
        raise ApiError(503, "this cluster runs no dashboard (its Jobs API); set "
                       "jobs.ray_address in the serve spec", code="jobs_unavailable")  # fmt: skip
    url = url.decode() if isinstance(url, bytes) else url
    return url if "://" in url else f"http://{url}"
