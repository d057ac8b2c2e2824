"""Server configuration: frozen dataclasses, one per concern. Each field's `help` is its CLI help.

The CLI builds its flags from these fields (cli.py), so adding a field here adds the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def option(default, help: str, **extra):
    """A dataclass field carrying its CLI help (and optional argparse extras like `choices`)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class HTTPConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = option(8000, "TCP port to listen on")
    max_request_bytes: int = option(
        64 * 1024 * 1024, "largest request body accepted, in bytes; larger bodies get HTTP 413"
    )
    max_openai_request_bytes: int = option(
        4 * 1024 * 1024, "largest request body accepted on the OpenAI API (/v1/), in bytes (at most "
        "--max-request-bytes); larger bodies get HTTP 413. Parsing JSON holds the GIL, so this bounds how long one "
        "body can hold up other requests (~12 ms per MiB of token ids)"
    )
    log_level: str = option(
        "info", "logging level", choices=("debug", "info", "warning", "error")
    )
    log_format: str = option("text", "log line format", choices=("text", "json"))
    max_concurrent_requests: int = option(
        1024, "most requests in flight at once (a stream counts until it ends); beyond it a request gets 503 with "
        "Retry-After at once; health probes and /metrics are exempt (0: unlimited)"
    )
    drain_timeout: float = option(
        30.0, "on SIGTERM: seconds in-flight requests (streams included) may take to finish before the server "
        "stops its models and exits"
    )
    health_port: int | None = option(
        None, "also answer /v2/health/live, /v2/health/ready and /health on this port, from a thread of their own: "
        "probes there never wait behind the main port's event loop, even under overload (same host as --host)"
    )
    grpc_port: int = option(
        8001, "also serve KServe v2 over gRPC (inference.GRPCInferenceService, what tritonclient.grpc speaks) on this "
        "port, same host as --host; 0: off"
    )
    console: bool = option(
        True, "serve the web console at / and /console (models, live figures, playgrounds; --no-console: off)"
    )
    otlp_traces_endpoint: str | None = option(
        None, "send OpenTelemetry traces (one span per request, children for queue, compute, tokenize, first token) "
        "to this OTLP endpoint, e.g. http://localhost:4317 (gRPC) or http://localhost:4318/v1/traces (HTTP); off "
        "when unset"
    )


@dataclass(frozen=True)
class RepositoryConfig:
    repository: Path | None = option(
        None, "model repository directory: <repo>/<model>/config.yaml and <repo>/<model>/<version>/",
        positional=True,
    )
    load_model: tuple[str, ...] = option(
        (), "load only these models at start-up (repeatable); default: every model in the repository"
    )
    strict_readiness: bool = option(
        True, "report ready only when every model the repository asks for is loaded"
    )




@dataclass(frozen=True)
class LLMConfig:
    """One LLM engine: the checkpoint, its numeric format, and the scheduler's and KV cache's budgets."""

    model: str | None = option(
        None, "serve this Hugging Face checkpoint directory (or hub id, where a network exists) over the OpenAI API"
    )
    served_model_name: str | None = option(None, "the name clients put in `model` (default: the directory's name)")
    dtype: str = option(
        "auto", "compute and KV cache dtype; auto = the checkpoint's dtype on CUDA and on CPUs with native bfloat16 "
        "(avx512_bf16/AMX), float32 on CPUs without it", choices=("auto", "float32", "bfloat16", "float16")
    )
    kv_cache_dtype: str = option(
        "auto", "element type of the paged KV cache; auto = the compute dtype (float16 under int8/int4 weights "
        "computing in float32 on a CPU, as llama.cpp's default cache). bfloat16 or float16 under a float32 model "
        "halve the cache's memory (twice the tokens in --kv-cache-memory) and the bytes each decode step's "
        "attention reads, at the cost of keys/values rounded to 16 bits (float16 keeps 3 more mantissa bits, "
        "bfloat16 float32's range); fp8 (= fp8_e4m3) or fp8_e5m2 store 8-bit floats, a quarter of float32's bytes "
        "and half of bfloat16's, values clamped to the type's range (no scales: vLLM's unscaled fp8)",
        choices=("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
    )
    quantization: str = option(
        "auto", "weight quantization of the linear layers: int8 (the faster of int8-dynamic and int8-weight-only "
        "on this host), int8-dynamic, int8-weight-only, int4 (group-wise), none; auto = a GGUF's own "
        "(Q4_x -> int4, other quantized types -> int8), none for float checkpoints",
        choices=("auto", "none", "int8", "int8-dynamic", "int8-weight-only", "int4"),
    )
    quantization_group_size: int = option(
        32, "input channels per int4 scale/zero group (32, 64 or 128)", choices=(32, 64, 128)
    )
    device: str = option("auto", "where the model runs; auto = cuda when available", choices=("auto", "cpu", "cuda"))
    kv_cache_memory: str = option("1GiB", "memory for the paged KV cache, e.g. 512MiB or 4GiB")
    num_kv_blocks: int | None = option(None, "size the KV cache in blocks instead of --kv-cache-memory")
    block_size: int = option(16, "tokens per KV-cache block")
    max_num_seqs: int = option(64, "most requests decoded together in one step")
    max_num_batched_tokens: int = option(2048, "token budget of one engine step (prefill chunks + decodes)")
    batch_share: float | None = option(
        None, "share of --max-num-seqs and of --max-num-batched-tokens that batch-job work (the Batches API, "
        "/v2/jobs) may hold while real-time requests are present (default 1/32: on a CPU every sequence in a "
        "step adds to real-time latency); with no real-time traffic a job uses the whole engine"
    )
    max_model_len: int | None = option(None, "context window (default: the model's max_position_embeddings)")
    enable_prefix_caching: bool = option(True, "reuse the KV cache of shared prompt prefixes across requests")
    enable_chunked_prefill: bool = option(True, "split long prompts over several steps so decodes keep flowing")
    num_threads: int | None = option(None, "torch CPU threads for the engine (default: torch's choice)")
    enforce_eager: bool | None = option(
        None, "run the decoder eagerly, without torch.compile (default: compile, in the background after start-up: "
        "the model serves eagerly until its compiled graphs are ready; LADLE_ENFORCE_EAGER=1 changes the default)"
    )
    # -- speculative decoding (issue 10); None = not set here: a repository LLM then takes the server's flag --
    speculative_method: str | None = option(
        None, "speculative decoding: ngram (prompt lookup: propose what followed the context's last n-gram earlier "
        "in the context), draft_model (a smaller checkpoint, --speculative-model), none (default: none, or "
        "draft_model when --speculative-model is given)", choices=("none", "ngram", "draft_model")
    )
    speculative_model: str | None = option(
        None, "draft checkpoint (directory or .gguf) sharing the model's tokenizer, for speculative decoding"
    )
    num_speculative_tokens: int | None = option(
        None, "most draft tokens verified per request and step (default 4); fewer where acceptance is poor"
    )
    ngram_min: int | None = option(None, "shortest context suffix n-gram the ngram method matches (default 2)")
    ngram_max: int | None = option(None, "longest context suffix n-gram the ngram method matches (default 4)")
    # -- limits on what one client may ask of the engine (issue 7: hardening) --
    trust_request_chat_template: bool = option(
        False, "accept a chat template sent by the client (chat_template / chat_template_kwargs.chat_template); "
        "off: such requests are a 400"
    )
    chat_template_timeout: float = option(5.0, "seconds a chat template may take to render before the request is a 400")
    max_waiting_requests: int = option(
        256, "most sequences waiting for the engine; beyond it new requests get 503 with Retry-After"
    )
    max_waiting_tokens: int = option(
        262144, "most prompt tokens waiting for the engine; beyond it new requests get 503 with Retry-After"
    )
    max_sequences_per_request: int = option(
        256, "most sequences one request may start (prompts x n); more is a 400"
    )
    request_timeout: float = option(
        0.0, "default deadline of an LLM request in seconds, queue and generation included (0: none); "
        "a request's `timeout` field or X-Request-Timeout header may ask for less"
    )


_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_bytes(text: str) -> int:
    """'512MiB' -> 536870912; plain integers are bytes. ValueError names the accepted units."""
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 1073741824, 512MiB or 2GiB") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"cannot read {text!r} as a size; units are B, KB, MB, GB, KiB, MiB, GiB")
    return int(value * _UNITS[unit])


@dataclass(frozen=True)
class SecurityConfig:
    """Who may call the API (bearer keys) and how often (a token bucket per key, or per client IP)."""

    api_key: tuple[str, ...] = option(
        (), "require `Authorization: Bearer KEY` on every API endpoint but the health probes (repeatable; "
        "also LADLE_API_KEY, comma-separated)"
    )
    api_key_file: Path | None = option(
        None, "read API keys from this file: one per line, blank lines and # comments ignored"
    )
    admin_key: tuple[str, ...] = option(
        (), "key for the repository load/unload API and cache resets; also valid wherever an API key is "
        "(repeatable; also LADLE_ADMIN_KEY, comma-separated)"
    )
    allow_admin_without_key: bool = option(
        False, "serve the repository load/unload API with no --admin-key set (off: those endpoints answer 403)"
    )
    protect_metrics: bool = option(False, "/metrics needs a key too (an API or admin key)")
    rate_limit: float = option(
        0.0, "requests per second allowed per API key (per client IP without keys); 0: no limit"
    )
    rate_limit_burst: int | None = option(
        None, "requests a key may send at once before --rate-limit applies (default: max(1, 2 x RPS))"
    )


@dataclass(frozen=True)
class JobsConfig:
    """The async batch path: where jobs and files live, and what one upload may hold."""

    data_dir: Path = option(
        Path("ladle-data"), "where batch jobs, their files and finished results are stored (SQLite in WAL mode plus "
        "files), and gated rollouts (rollouts/), so they survive a restart; created on first use"
    )
    jobs_db: str | None = option(
        None, "share one job store between several servers: a PostgreSQL URL (postgresql://user@host/db); files and "
        "results then live in the database and --data-dir holds only rollouts"
    )
    max_batch_file_bytes: int = option(
        200 * 1024 * 1024, "largest batch input file accepted (POST /v1/files, POST /v2/jobs), in bytes; larger "
        "uploads get HTTP 400"
    )
    max_batch_lines: int = option(50000, "most lines (requests) one batch input file may hold; more is HTTP 400")
    max_active_jobs: int = option(
        1000, "most unfinished batch jobs at once (the job runner walks them every tick); more get HTTP 429"
    )
    batch_lines_in_flight: int | None = option(
        None, "most lines of batch jobs running at once per model (default: 1.5 x the model's --max-num-seqs for an "
        "LLM, 2 x max_batch_size x instances for a classic model)"
    )


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas on a Ray cluster (cluster/, the `ray` extra): how many, how they scale, what each one holds.

    A model's config.yaml may set its own (a `cluster:` block); these flags are the defaults."""

    ray: str | None = option(
        None, "deploy every model as a Ray Serve deployment: `--ray` or `--ray auto` joins the Ray cluster running "
        "here (ray start) or starts a local one; `--ray ADDRESS` joins that cluster (its GCS address, "
        "host:6379; run ladle on a node of the cluster); needs `pip install 'ladle[ray]'`",
        nargs="?", const="auto", metavar="auto|ADDRESS",
    )
    ray_app_prefix: str = option(
        "ladle-", "Serve application and deployment names are this prefix + the model's name: give each `ladle serve "
        "--ray` sharing one cluster a prefix of its own (a second one with the same prefix replaces the first's)"
    )
    replicas: int = option(1, "replicas of each model (fixed; see --min-replicas/--max-replicas to autoscale)")
    min_replicas: int | None = option(
        None, "autoscale each model between --min-replicas and --max-replicas (at least 1) on ongoing requests "
        "per replica; idle models go back down to the minimum"
    )
    max_replicas: int | None = option(None, "most replicas of each model when autoscaling")
    target_ongoing_requests: float = option(
        2.0, "autoscaling: requests in flight per replica the autoscaler aims for"
    )
    upscale_delay: float = option(5.0, "autoscaling: seconds of sustained load before replicas are added")
    downscale_delay: float = option(60.0, "autoscaling: seconds of low load before replicas are removed")
    num_cpus: float = option(1.0, "CPUs Ray reserves for each replica")
    num_gpus: float = option(0.0, "GPUs Ray reserves for each replica")
    max_ongoing_requests: int | None = option(
        None, "most requests one replica holds at once; the router queues the rest (default: 2 x --max-num-seqs "
        "for an LLM, 4 x max_batch_size x instances for a classic model, at least 16)"
    )
    max_queued_requests: int = option(
        1024, "most requests the front end queues per model while every replica is full; beyond it 503"
    )
    llm_routing: str = option(
        "prefix", "how LLM requests pick a replica: prefix (to the replica caching the prompt's head, within "
        "--prefix-imbalance) or power-of-two (the shorter queue of two random replicas)",
        choices=("prefix", "power-of-two"),
    )
    prefix_imbalance: int = option(
        8, "LLM routing: a request goes to the replica caching its prompt's prefix unless that replica has this "
        "many more requests in flight than the least loaded one"
    )

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


@dataclass(frozen=True)
class ServerConfig:
    http: HTTPConfig = field(default_factory=HTTPConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# LLMConfig fields a repository LLM takes from the server's flags when its own config leaves them unset (None)
SPECULATIVE_FIELDS = ("speculative_method", "speculative_model", "num_speculative_tokens", "ngram_min", "ngram_max")
INHERITED_FIELDS = (*SPECULATIVE_FIELDS, "batch_share", "enforce_eager")
