"""What the job store holds: files, jobs (an OpenAI batch or a KServe job) and their lines — plain frozen data.

Invariant: a job's externally visible `status` only moves forward along OpenAI's machine
(validating -> in_progress -> finalizing -> completed; failed; cancelling -> cancelled; expired), and a line is
`pending`, `running` (claimed by one server, under a lease) or `done` (its result stored, never run again).
"""

from __future__ import annotations

from dataclasses import dataclass

# job statuses (OpenAI's names)
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
EXPIRED = "expired"
STATUSES = (VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED, FAILED, CANCELLING, CANCELLED, EXPIRED)
TERMINAL = (COMPLETED, FAILED, CANCELLED, EXPIRED)
#: the status a job has once its output files are written, by the status it was finalized from
FINAL_STATUS = {FINALIZING: COMPLETED, CANCELLING: CANCELLED, IN_PROGRESS: EXPIRED}

# line states
PENDING = "pending"
RUNNING = "running"
DONE = "done"

# job kinds
OPENAI = "openai"  # lines are {"custom_id", "method", "url", "body"}; output in OpenAI's batch format
KSERVE = "kserve"  # lines are KServe v2 infer requests for one model; output {"line", "id", "status_code", ...}

# file purposes
BATCH = "batch"
BATCH_OUTPUT = "batch_output"


@dataclass(frozen=True)
class FileRecord:
    id: str  # "file-<hex>"
    filename: str
    purpose: str  # "batch" (uploaded) or "batch_output" (a job's output or error file)
    bytes: int
    created_at: int  # unix seconds
    lines: int = 0  # JSONL lines (non-empty), counted at upload


@dataclass(frozen=True)
class JobRecord:
    id: str  # "batch_<hex>" (OpenAI batches) or "job-<hex>" (KServe jobs)
    kind: str  # OPENAI | KSERVE
    endpoint: str  # "/v1/chat/completions", ... or "/v2/models/{m}[/versions/{v}]/infer"
    input_file_id: str
    completion_window: str  # "24h" as OpenAI's; any "<n>s|m|h|d" is accepted
    status: str
    created_at: int
    expires_at: int
    model: str | None = None  # KServe jobs: the model; OpenAI batches: the model the lines name, once validated
    metadata: dict[str, str] | None = None
    errors: list[dict] | None = None  # validation errors: [{"code", "message", "line", "param"}]
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None


@dataclass(frozen=True)
class LineRecord:
    """One input line of a job, as the runner claims it."""

    job_id: str
    line_no: int  # 0-based position in the input file (blank lines skipped)
    custom_id: str | None
    url: str  # where it goes in-process: "/v1/chat/completions", "/v2/models/m/infer", ...
    body: bytes  # the request body to send (JSON)


@dataclass(frozen=True)
class LineResult:
    """A finished line: `ok` lines go to the output file, the others to the error file; `record` is the line's
    whole JSONL record (without the newline), already in the job's output format."""

    job_id: str
    line_no: int
    ok: bool
    record: bytes
