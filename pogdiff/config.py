"""One config system: typed dataclasses, YAML files in ``configs/``, dotted overrides.

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-4", "method.name=vanilla"])

OmegaConf validates types against the dataclasses; this module turns its errors into messages
that name the key, the closest valid key, or the expected type.
"""
from __future__ import annotations

import difflib
import enum
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pogdiff.seeds import derive_seed


class ConfigError(ValueError):
    """A config file or override is wrong; the message says where and what to do."""


class Method(str, enum.Enum):
    pogdiff = "pogdiff"
    vanilla = "vanilla"
    cbdm = "cbdm"
    t2h = "t2h"


class DensityForm(str, enum.Enum):
    eq11 = "eq11"  # psi_inv = exp(-ELBO) / a3 (Eq. 11 as printed), in log space
    temperature = "temperature"  # this project's earlier map: exp(-ELBO)^(1/T), clipped (not the paper's)


class GradMode(str, enum.Enum):
    full = "full"  # Alg. 1 as printed: gradient flows into both halves of [y; y']
    stop = "stop"  # e' = UNet(x_t, t, y') is detached


@dataclass
class ModelConfig:
    # "tiny" (random-init tiny SD components, no download), a local diffusers directory, or a hub id.
    name: str = "tiny"
    revision: Optional[str] = None
    seed: int = 0  # initialisation seed of the tiny model
    gradient_checkpointing: bool = False
    # The tiny VAE is pretrained as an autoencoder on identities disjoint from the fine-tuning set
    # (pogdiff.tiny_vae) before it encodes anything; a random-init VAE would make images meaningless.
    tiny_vae_steps: int = 200
    attention: str = "auto"  # "auto" (xformers when installed and on CUDA, else SDPA) | "sdpa" | "xformers"


@dataclass
class DataConfig:
    # "synthetic" (the generator, data.profile), a JSONL or CSV manifest, an image folder with a
    # Hugging Face imagefolder metadata.jsonl/metadata.csv, or a prepared dataset directory. Any
    # source that is not prepared yet is prepared once (pogdiff.data.dataset.resolve_dataset).
    source: str = "synthetic"
    # Manifest columns (diffusers' names). None: "image" or "file_name"; "caption" or "text".
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    identity_column: str = "identity"
    name_column: str = "name"  # the identity's name in prompts; else the identity label
    dataloader_num_workers: int = 0  # DataLoader worker processes per training rank (0: in the rank)
    shuffle_buffer: int = 1000  # samples mixed across shards in each reader
    # diffusers' --max_train_samples: prepare keeps this many training records (a seeded random
    # choice, data.seed), for quick runs. None = all.
    max_train_samples: Optional[int] = None
    # Images are resized (shorter side to data.image_size) and cropped once, at prepare (latents
    # are cached): centre crop, or a random crop drawn per record from data.seed.
    center_crop: bool = True
    # Prepare also encodes each image's mirror; the reader then takes either latent with p = 1/2
    # per sample and epoch (diffusers' --random_flip, on cached latents).
    random_flip: bool = False
    # Imbalance preset (see pogdiff.synthetic.PROFILES) or "custom" with the counts below.
    profile: str = "agedb-s"
    majority_ids: int = 1
    minority_ids: int = 1
    majority_images: int = 30
    minority_images: int = 2
    # Synthetic identities' names: "distinct" (no first or last name shared by two identities, as
    # the paper's distinct people; vocabulary names for the first 58, then pseudo-words), "pseudo"
    # (pseudo-words for all) or "grid" (first x last name grid, names shared; the pretraining's).
    names: str = "distinct"
    image_size: int = 32
    # Per identity, never trained on: the DINO-style score's real set. A manifest identity gives
    # these only while it keeps more than data.minority_images training images; synthetic ones always.
    heldout_images: int = 4
    seed: int = 0
    # Image encoder for neighbours: "tiny" (weight-free pixel statistics) or a local HF vision model.
    image_encoder: str = "tiny"


@dataclass
class MethodConfig:
    name: Method = Method.pogdiff
    grad_mode: GradMode = GradMode.full
    # grad_mode=stop: run the y' half as a separate no_grad forward (~4/3 of a vanilla step
    # instead of ~2x); false keeps one UNet call on the concatenated batch with e' detached.
    stop_split_forward: bool = True
    k: int = 10  # neighbours per sample (Eq. 8)
    a1: float = 1.0  # Eq. 9 exponent for same-identity neighbours
    a2: float = 1.0  # Eq. 9 extra exponent for different-identity neighbours
    a3: float = 1.0  # Eq. 11 scale of the inverse text density
    psi_img: bool = True  # Table 6 ablation "w/o psi_img" when false
    psi_inv: bool = True  # Table 6 ablation "w/o psi_inv" when false
    cbdm_tau: float = 1.0
    # PoGDiff trains as Vanilla for this many steps before its pair term starts (0: from the first);
    # a warm-up that lets the names bind before the pair term pulls y towards y'.
    pair_start: int = 0


@dataclass
class DensityConfig:
    """The text-embedding VAE of Eq. 10-11 and the log-space normalisation of psi_inv."""

    latent_dim: int = 16
    hidden_dim: int = 128
    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    elbo_samples: int = 16  # Monte-Carlo samples per ELBO evaluation
    # How -ELBO becomes psi_inv (pogdiff.method.density), with nll = -ELBO:
    # eq11 (the paper's Eq. 11): log psi_inv = nll - anchor - log a3, anchor = the anchor_quantile
    #   quantile of the training NLL (a caption that rare gets psi_inv = 1 / a3; no exponent),
    #   clipped only against float overflow.
    # temperature (this project's earlier map, not the paper's): log psi_inv = clip((nll - median) / T,
    #   +-log_clip) - log a3, i.e. exp(-ELBO)^(1/T); T = density.temperature, or None: sd(NLL).
    form: DensityForm = DensityForm.eq11
    anchor_quantile: float = 0.99
    temperature: Optional[float] = None  # form=temperature only
    log_clip: float = 3.0  # form=temperature only: |log psi_inv + log a3| <= log_clip (3 sd)
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda": where the VAE trains and scores
    # Scoring (-ELBO per row, psi per (row, neighbour)) is a map over row ranges: Ray tasks on the cluster at
    # dist.ray_address / $RAY_ADDRESS, or on an embedded one from this many rows; below it, in this process.
    distributed_min_rows: int = 2_000_000


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    scale_lr: bool = False  # lr *= batch_size * grad_accum * workers (diffusers' --scale_lr)
    # "auto": bf16 autocast on a GPU that has it (fp16 on one that does not), fp32 on the CPU;
    # "no" | "fp16" | "bf16" as diffusers' --mixed_precision. Weights and optimizer stay fp32; fp16
    # adds a gradient scaler. train-dist runs bf16 or fp32 (see pogdiff.dist.deepspeed_config).
    mixed_precision: str = "auto"
    allow_tf32: bool = False  # TF32 matmuls and convolutions on Ampere+ GPUs
    # Epochs of the training set; when set, train.steps = ceil(epochs * samples / (batch_size *
    # grad_accum * workers)) (diffusers' --num_train_epochs; the derived steps are logged).
    num_train_epochs: Optional[int] = None
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    loss_backend: str = "auto"  # pogdiff.kernels dispatch: "auto" | "torch" | "triton"
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none (the distributed job still saves the last)
    checkpoint_keep: int = 2  # checkpoints kept (Ray: CheckpointConfig.num_to_keep)
    # batch_size is per worker and micro-batch: one optimizer step sees batch_size * grad_accum * workers.
    grad_accum: int = 1
    optimizer: str = "adamw"  # "adamw" (torch) | "adamw8bit" (bitsandbytes; a client optimizer under DeepSpeed)
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    ema: bool = False  # exponential moving average of the UNet, exported instead of the raw weights
    ema_decay: float = 0.9999  # max decay; warmed up like diffusers' EMAModel: min(ema_decay, (1 + n) / (10 + n))
    ema_offload: bool = False  # keep the EMA shadow on the CPU
    # Min-SNR weighting: w_i = min(SNR(t_i), gamma) / SNR(t_i) (epsilon; / (SNR + 1) for v_prediction, / 1
    # for sample, as diffusers does) multiplies the whole per-sample two-term loss, both terms alike.
    # None = off; 5.0 is the paper's choice.
    snr_gamma: Optional[float] = None
    # What the UNet predicts: None = the model's scheduler config (SD 2.x 768: v_prediction);
    # "epsilon" | "v_prediction" | "sample" override it (diffusers' --prediction_type). The export
    # carries the type that was trained.
    prediction_type: Optional[str] = None
    noise_offset: float = 0.0  # eps += noise_offset * N(0, 1) per (sample, channel)
    # x_t is noised with eps + input_perturbation * N(0, 1) while the target stays eps (Ning et al.
    # 2023, diffusers' --input_perturbation; 0.1 is their suggestion). 0 = off.
    input_perturbation: float = 0.0
    report_to: str = "tensorboard"  # "tensorboard" | "wandb" | "all" | "none"
    validate_every: int = 0  # steps between DDIM validation grids; 0 = none
    validation_epochs: Optional[int] = None  # when set: a validation grid every this many epochs instead
    validation_prompts: list[str] = field(default_factory=list)  # empty: one head and one tail identity
    validation_images: int = 2  # per prompt
    validation_ddim_steps: int = 20
    # A run records its training config; rerunning its run_name with checkpoints of another config:
    # "auto" refuses (naming the changed keys), "never" starts over (deleting them), "force" resumes.
    resume: str = "auto"
    # A checkpoint directory (step_*, from this or another run) to start from when the run has
    # none of its own; its weights, optimizer state and step are restored (diffusers'
    # --resume_from_checkpoint; its "latest" is what every run does by default).
    resume_from_checkpoint: Optional[str] = None
    # A step whose loss is not finite on any rank is skipped on every rank (no backward, no optimizer
    # step, no EMA update) and its samples' keys logged; a sample in two such steps is dropped from
    # the stream. This many bad steps in a row stop the run with an error.
    max_bad_steps: int = 5
    # The run's lease (pogdiff.runs.run_lease): renewed every lease_timeout/10 s; a lease whose
    # renewal is older than this (its holder gone without releasing it) is taken over.
    lease_timeout: float = 300.0
    # "none": the whole UNet trains. "lora": peft LoRA adapters on train.lora_target_modules train
    # and the UNet stays frozen; checkpoints hold the adapter and its optimizer state, the export is
    # diffusers LoRA weights (<run>/<method>/lora/, for pipe.load_lora_weights) on the same base.
    adapter: str = "none"
    lora_rank: int = 4
    lora_alpha: Optional[float] = None  # None: lora_rank (a scale of 1, as diffusers' LoRA scripts)
    lora_dropout: float = 0.0
    # diffusers' LoRA scripts' default: the attention projections
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    lora_use_dora: bool = False  # DoRA (peft's use_dora)


@dataclass
class ExportConfig:
    # train.adapter=lora: also write the base pipeline with the adapter fused in (<method>/pipeline)
    fuse_lora: bool = False


@dataclass
class DistConfig:
    """The Ray Train + DeepSpeed job (pogdiff.dist)."""

    num_workers: int = 2
    use_gpu: bool = False  # GPU: NCCL + train.mixed_precision (bf16); CPU: gloo + fp32 (DS_ACCELERATOR=cpu)
    cpus_per_worker: int = 1
    zero_stage: int = 2  # DeepSpeed ZeRO stage of the UNet (VAE and text encoder are never wrapped)
    deepspeed_json: Optional[str] = None  # a JSON file deep-merged over the generated DeepSpeed config
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS, else an embedded local cluster
    storage_path: Optional[str] = None  # shared storage for Ray checkpoints; None: <output_dir>/ray
    max_failures: int = 2  # worker-group restarts from the latest checkpoint (FailureConfig)
    # An embedded cluster has this machine's CPUs: more workers than that exit 2 unless this is true
    # (ranks then share cores, which only a test of the distributed code path wants).
    allow_oversubscribe: bool = False
    # The start watchdog: a rank still starting (its DeepSpeed engine: the process-group rendezvous,
    # the CPU op build) or waiting for its first batch after start_timeout seconds is named on the
    # console with what it waits on; after stop_timeout the job stops (exit 1; a rerun resumes).
    start_timeout: float = 300.0
    stop_timeout: float = 1800.0


@dataclass
class SampleConfig:
    steps: int = 50  # DDIM steps
    guidance_scale: float = 5.0
    images_per_id: int = 4
    batch_size: int = 16
    prompt_template: str = "An image of {p}."
    seed: int = 1234
    # 0: sample and extract eval features in this process; N: a pool of N Ray actors, one pipeline
    # (or encoder) each, one GPU each on a cluster with GPUs (train.device auto|cuda)
    ray_workers: int = 0
    # 0: sample and score every identity. N > 0: every majority identity and N minority ones drawn
    # with sample.seed, the same in every run (an evaluation sized to a CPU; "Few" is then their mean).
    few_ids: int = 0
    # The seed of the initial noise; null: sample.seed (`pogdiff sample` / `eval` on a plain config).
    # An experiment's runs (variant_config) get derive_seed(sample.seed, train.seed), whatever is set
    # here: its seeds sample with independent noise; sample.seed still draws sample.few_ids, the
    # same in every run.
    noise_seed: Optional[int] = None
    # More guidance scales at which eval samples and scores the same trained weights (each in its own
    # samples folder; metrics.json "by_guidance"). Empty: sample.guidance_scale only.
    guidance_scales: list[float] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Metrics of Sec. 4.1 / App. C, F (pogdiff.eval)."""

    # "recognizer": a small identity-recognition CNN trained here on synthetic identities disjoint
    # from the fine-tuning set; or a local Hugging Face vision model directory (e.g. DINOv2).
    encoder: str = "recognizer"  # synthetic data: trained on disjoint identities; own data: on its training split
    grecall_threshold: float = 0.7  # cosine similarity above which a generated image covers a training image
    # The metrics are marked invalid (metrics.json "valid": false, and in the report) when the
    # recogniser identifies fewer held-back real images than this: its features cannot tell identities apart.
    min_encoder_accuracy: float = 0.8
    fid_eps: float = 1e-6  # added to the diagonal of the (Ledoit-Wolf shrunk) covariances
    batch_size: int = 128  # images per encoder forward
    recognizer_ids: int = 200
    recognizer_images_per_id: int = 10
    recognizer_steps: int = 400
    recognizer_dim: int = 64
    recognizer_lr: float = 3e-3


# Experiment variant -> method overrides (Tables 1, 2, 5: the methods; Table 6: the ablations).
# The one list of methods and variants: the demo, the experiment and the report read it from here.
METHODS = ["vanilla", "cbdm", "t2h", "pogdiff"]  # Tables 1, 2, 5 (and the demo)
ABLATION = ["vanilla", "pogdiff-no_psi_img", "pogdiff-no_psi_inv", "pogdiff-stop", "pogdiff",
            "pogdiff-a3x16", "pogdiff-a2x16"]  # Table 6 (w/o y' is vanilla), and the sweeps' closest points
VARIANTS: dict[str, dict] = {
    "vanilla": {"name": "vanilla"},  # Table 6 "w/o y'"
    "cbdm": {"name": "cbdm"},
    "t2h": {"name": "t2h"},
    "pogdiff": {"name": "pogdiff"},
    "pogdiff-stop": {"name": "pogdiff", "grad_mode": GradMode.stop},  # the y' half without gradient
    "pogdiff-no_psi_img": {"name": "pogdiff", "psi_img": False},
    "pogdiff-no_psi_inv": {"name": "pogdiff", "psi_inv": False},
    "pogdiff-a3x16": {"name": "pogdiff", "a3": 16.0},  # the pair term at a sixteenth: docs/sweep/issue22's best point
    "pogdiff-a2x16": {"name": "pogdiff", "a2": 16.0},  # Eq. 9's identity preference acting (docs/sweep)
}


@dataclass
class ExperimentConfig:
    """``pogdiff experiment``: every variant x seed on the same data and steps, then the report."""

    variants: list[str] = field(default_factory=lambda: [
        "vanilla", "cbdm", "t2h", "pogdiff", "pogdiff-no_psi_img", "pogdiff-no_psi_inv"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    report_dir: Optional[str] = None  # default <output_dir>/<run_name>/report


@dataclass
class SweepConfig:
    """``pogdiff sweep``: PoGDiff at each point (a name and its dotted overrides), against the
    baselines on the same data and seeds (pogdiff.experiment.sweep)."""

    # name -> overrides; empty: the config as it is, as one point named "config". (A default point
    # here would be merged into every file's points.)
    points: dict[str, list[str]] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: ["vanilla", "cbdm"])
    report_dir: Optional[str] = None  # default <output_dir>/<run_name>/sweep


@dataclass
class PretrainConfig:
    """``pogdiff pretrain``: the tiny model's base. UNet and text encoder trained from scratch on
    balanced synthetic identities disjoint from every fine-tuning profile (names from the same
    pools, captions from the same grammar); the VAE is the pretrained tiny VAE."""

    ids: int = 256
    images_per_id: int = 16
    heldout_images: int = 4  # more images of each identity, never trained on: the go/no-go's reference
    steps: int = 4000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    name_prompt_fraction: float = 0.5  # captions replaced by sample.prompt_template with the bare name
    caption_dropout: float = 0.1  # captions replaced by "" (classifier-free guidance)
    eval_ids: int = 16  # identities the go/no-go samples
    output: Optional[str] = None  # default <output_dir>/tiny-base


@dataclass
class SSLConfig:
    """``pogdiff pretrain-encoder``: the neighbours' learned image encoder (``data.image_encoder=tiny-ssl``),
    SimCLR on unlabelled renders of synthetic identities disjoint from every fine-tuning profile and
    from the recogniser's (pogdiff.models.ssl_encoder)."""

    ids: int = 1024
    images_per_id: int = 4
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 0.2
    dim: int = 64  # the embedding's width
    seed: int = 0
    output: Optional[str] = None  # default <output_dir>/tiny-ssl


@dataclass
class PrepareConfig:
    """``pogdiff prepare``: data.source (a JSONL/CSV manifest, or "synthetic") -> WebDataset shards.

    Images are resized (shorter side) and centre-cropped to data.image_size; the neighbours'
    image encoder is data.image_encoder; the imbalance counts are data.profile & co.
    """

    # Dataset directory; default <output_dir>/datasets/<source name>-<fingerprint>, shared by every
    # run and verb with the same source, model and prepare settings.
    output: Optional[str] = None
    image_root: Optional[str] = None  # manifest image paths are relative to this (default: the manifest's folder)
    samples_per_shard: int = 1000  # records per shard task (a shard never holds more)
    max_shard_bytes: int = 1 << 30  # a shard that would grow past this rolls over into a new part
    # "ray": a Ray Data pipeline (decode tasks -> an actor pool of the frozen encoders -> shard writes) on
    # the cluster at dist.ray_address / $RAY_ADDRESS, else on an embedded one; "serial": in this process
    backend: str = "ray"
    workers: int = 0  # encoder actors; 0: one per GPU of the cluster (with GPUs), else its CPUs but one
    gpus_per_worker: Optional[float] = None  # GPUs per encoder actor; None: 1 where the cluster has GPUs
    batch_size: int = 32  # encoder batch
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    precision: str = "auto"  # the encoders on a GPU: "auto" (bf16) | "bf16" | "fp16" | "fp32"; fp32 on a CPU
    mask_names: bool = False  # replace real names in captions by generic ones, consistent per identity
    imbalance: bool = False  # subset a manifest to data.profile's majority/minority counts
    strict: bool = False  # bad records are errors instead of being skipped and counted
    # Shards also carry the image (PNG, at data.image_size) and the caption text, so standard tools can
    # read them; evaluation needs them (the real image sets come from the dataset).
    keep_images: bool = True
    allow_outside_root: bool = False  # manifest paths may leave image_root (.., absolute paths)
    seed: int = 0  # name masking and the imbalance subset


class IndexType(str, enum.Enum):
    auto = "auto"  # FAISS's guidelines by dataset size: flat, then ivf; ivfpq where full vectors do not fit a shard's memory
    flat = "flat"  # exact inner product
    ivf = "ivf"  # inverted lists of full vectors
    ivfpq = "ivfpq"  # inverted lists of product-quantised codes (when the vectors do not fit)


@dataclass
class IndexConfig:
    """FAISS neighbour service and kNN-graph build (pogdiff.dist.neighbour_service / knn_graph)."""

    type: IndexType = IndexType.auto
    flat_max: int = 100_000  # auto: exact Flat up to this many vectors, IVF above
    # GiB a shard's index may take (auto: IVF-PQ when full vectors would not fit); 0 = from the nodes: 3/4 of
    # Ray's memory per node, and of the shard's GPUs' memory, shared by the shards a node takes
    memory_gb: float = 0.0
    nlist: int = 0  # IVF lists; 0 = FAISS's guideline, 4*sqrt(N) rounded up to a power of two
    nprobe: int = 16  # IVF lists visited per query (recall@10 >= 0.95 on clustered data: benchmarks/neighbours.py)
    pq_m: int = 0  # IVF-PQ bytes per vector; 0 = dim / 8
    train_size: int = 0  # IVF training vectors; 0 = 40 * nlist (FAISS asks for 30-256 per list, warns below 39)
    # Ray actors, each holding a contiguous slice of the dataset; 0 = from the alive nodes: every GPU, in equal
    # parts as large as the smallest GPU node (4 nodes x 8 GPUs: 4 shards of 8), or one shard per CPU node
    shards: int = 0
    # GPUs per shard actor (a whole number, or below 1), at most one node's; null = from the nodes (above),
    # 0 = CPU shards (a service beside training)
    gpus_per_shard: Optional[float] = None
    actor_min_n: int = 50_000  # below this N the graph is built in-process (Ray's start-up costs more)
    batch_size: int = 16_384  # query vectors per search call
    recall_sample: int = 1000  # queries checked against exact search for approximate indexes
    name: str = "pogdiff-neighbours"  # shard i is the named Ray actor "<name>-<i>"
    namespace: str = "pogdiff"
    max_restarts: int = 5  # Ray restarts a dead shard, which reloads its index from disk
    # Ray CPUs per shard actor, which are also its FAISS threads, at most one node's; 0 = a node's CPUs
    # shared by the shards it takes (for the build: set it small for a service that runs beside training)
    cpus_per_shard: float = 0.0
    seed: int = 0


@dataclass
class StorageConfig:
    """Object storage (``s3://``, ``gs://``: any fsspec URL) in prepare.output, data.source and
    dist.storage_path (pogdiff.storage). Endpoint and credentials come from the standard places
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws; Google's application
    default credentials); these options override them."""

    # fsspec storage options per protocol, e.g. {s3: {endpoint_url: "http://minio:9000", key: ..., secret: ...}}
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # An operation on object storage that fails for a reason other than the object's own state
    # (missing, access denied) is retried with exponential backoff for this many seconds, then the
    # verb stops with one line naming the URI (exit 1); a rerun continues from what was finished.
    retry_timeout: float = 120.0


@dataclass
class Config:
    run_name: str = "demo"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        key = prefix + f.name
        keys.append(key)
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys.extend(_valid_keys(value, key + "."))
    return keys


def _closest(key: str, schema: Any) -> str:
    candidates = _valid_keys(schema())
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:  # a typo in the leaf only: compare against the leaf names
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)]
    return f"; did you mean '{match[0]}'?" if match else ""


def _explain(err: OmegaConfBaseException, source: str, schema: Any, key: str | None = None) -> ConfigError:
    key = key or getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{source}: unknown config key '{key}'{_closest(key, schema)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg} (expected {_field_type(schema, key)})")
    return ConfigError(f"{source}: {err}")


def _field_type(schema: Any, key: str) -> str:
    """The declared type of a dotted key, as written in the dataclass: 'int', 'Optional[str]', a
    section's name for a whole section, or one of an enum's values."""
    node, hint = schema, None
    for part in key.split("."):
        hints = typing.get_type_hints(node) if is_dataclass(node) else {}
        if part not in hints:
            return "a value of the schema's type"
        hint = hints[part]
        node = hint
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(m.value for m in hint)
    if is_dataclass(hint):
        return f"the section {key} (set its keys: {key}.<name>=value)"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.path=value (e.g. train.lr=1e-4)")
    key, value = item.split("=", 1)
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: Any = Config) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated against the dataclasses."""
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for examples)")
        try:
            raw = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            merged = OmegaConf.merge(merged, raw)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path), schema) from None
    return _finish(merged, overrides, str(path or "config"), schema)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with dotted overrides applied, validated as ``load_config`` validates a file's."""
    return _finish(OmegaConf.structured(cfg), overrides, "config", Config)


def _finish(merged, overrides: Sequence[str], source: str, schema: Any) -> Config:
    for item in overrides:
        key, value = _parse_override(item)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'", schema, key) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, source, schema) from None
    _check_values(cfg)
    return cfg


# key -> (low, high, what the bounds mean): every number a run reads is checked at load, so a bad
# value exits 2 naming the key before anything starts. "(" / ")" mark an open bound.
RANGES: dict[str, tuple[str, float, float, str]] = {
    "train.steps": ("[", 1, math.inf, ")"), "train.batch_size": ("[", 1, math.inf, ")"),
    "train.lr": ("(", 0, math.inf, ")"), "train.weight_decay": ("[", 0, math.inf, ")"),
    "train.adam_beta1": ("[", 0, 1, ")"), "train.adam_epsilon": ("(", 0, 1, ")"),
    "train.input_perturbation": ("[", 0, math.inf, ")"), "train.adam_beta2": ("[", 0, 1, ")"), "train.grad_clip": ("[", 0, math.inf, ")"),
    "train.log_every": ("[", 1, math.inf, ")"), "train.checkpoint_every": ("[", 0, math.inf, ")"),
    "train.validate_every": ("[", 0, math.inf, ")"), "train.validation_images": ("[", 1, math.inf, ")"),
    "train.validation_ddim_steps": ("[", 1, math.inf, ")"), "train.caption_dropout": ("[", 0, 1, "]"),
    "method.a1": ("[", 0, math.inf, ")"), "method.a2": ("[", 0, math.inf, ")"), "method.a3": ("(", 0, math.inf, ")"),
    "method.cbdm_tau": ("[", 0, math.inf, ")"), "method.pair_start": ("[", 0, math.inf, ")"),
    "density.epochs": ("[", 1, math.inf, ")"), "density.lr": ("(", 0, math.inf, ")"),
    "density.batch_size": ("[", 1, math.inf, ")"), "density.latent_dim": ("[", 1, math.inf, ")"),
    "density.hidden_dim": ("[", 1, math.inf, ")"), "density.elbo_samples": ("[", 1, math.inf, ")"),
    "density.log_clip": ("(", 0, math.inf, ")"), "density.anchor_quantile": ("[", 0, 1, "]"), "density.distributed_min_rows": ("[", 1, math.inf, ")"),
    "data.image_size": ("[", 8, math.inf, ")"), "data.majority_ids": ("[", 0, math.inf, ")"),
    "data.minority_ids": ("[", 0, math.inf, ")"), "data.majority_images": ("[", 1, math.inf, ")"),
    "sample.guidance_scale": ("[", 0, math.inf, ")"), "sample.ray_workers": ("[", 0, math.inf, ")"),
    "sample.few_ids": ("[", 0, math.inf, ")"),
    "sample.images_per_id": ("[", 2, math.inf, ")"),  # eval's per-identity FID needs 2 images of each identity
    "eval.min_encoder_accuracy": ("[", 0, 1, "]"), "eval.fid_eps": ("[", 0, math.inf, ")"),
    "eval.batch_size": ("[", 1, math.inf, ")"), "eval.recognizer_ids": ("[", 2, math.inf, ")"),
    "eval.recognizer_images_per_id": ("[", 2, math.inf, ")"), "eval.recognizer_steps": ("[", 1, math.inf, ")"),
    "eval.recognizer_dim": ("[", 1, math.inf, ")"), "eval.recognizer_lr": ("(", 0, math.inf, ")"),
    "dist.cpus_per_worker": ("[", 1, math.inf, ")"), "dist.start_timeout": ("(", 0, math.inf, ")"),
    "dist.stop_timeout": ("(", 0, math.inf, ")"), "dist.max_failures": ("[", 0, math.inf, ")"),
    "model.tiny_vae_steps": ("[", 0, math.inf, ")"), "pretrain.ids": ("[", 2, math.inf, ")"),
    "pretrain.images_per_id": ("[", 1, math.inf, ")"), "pretrain.heldout_images": ("[", 1, math.inf, ")"),
    "pretrain.steps": ("[", 1, math.inf, ")"), "pretrain.batch_size": ("[", 1, math.inf, ")"),
    "pretrain.lr": ("(", 0, math.inf, ")"), "pretrain.warmup_steps": ("[", 0, math.inf, ")"),
    "pretrain.name_prompt_fraction": ("[", 0, 1, "]"), "pretrain.caption_dropout": ("[", 0, 1, "]"),
    "train.lora_rank": ("[", 1, math.inf, ")"), "train.lora_dropout": ("[", 0, 1, ")"),
    "pretrain.eval_ids": ("[", 1, math.inf, ")"), "train.max_bad_steps": ("[", 1, math.inf, ")"), "train.lease_timeout": ("(", 0, math.inf, ")"),
    "storage.retry_timeout": ("(", 0, math.inf, ")"), "prepare.batch_size": ("[", 1, math.inf, ")"),
    "ssl.ids": ("[", 2, math.inf, ")"), "ssl.images_per_id": ("[", 1, math.inf, ")"), "ssl.steps": ("[", 1, math.inf, ")"),
    "ssl.batch_size": ("[", 2, math.inf, ")"), "ssl.lr": ("(", 0, math.inf, ")"), "ssl.temperature": ("(", 0, math.inf, ")"),
    "ssl.dim": ("[", 1, math.inf, ")"),
}


def _value(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _range_problems(cfg: Config) -> list[str]:
    problems = []
    for key, (lo_b, lo, hi, hi_b) in RANGES.items():
        v = _value(cfg, key)
        ok = math.isfinite(v) and (v > lo if lo_b == "(" else v >= lo) and (v < hi if hi_b == ")" else v <= hi)
        if not ok:
            hi_txt = "inf" if hi == math.inf else f"{hi:g}"
            problems.append(f"{key}={v} is outside {lo_b}{lo:g}, {hi_txt}{hi_b}" + ("" if math.isfinite(v) else " (not finite)"))
    return problems


def _check_values(cfg: Config) -> None:
    """Constraints a type cannot express."""
    problems = _range_problems(cfg)
    if cfg.model.name == "tiny" and cfg.data.image_size % 4:  # VAE /2, then the tiny UNet's one downsampling /2
        problems.append(f"data.image_size={cfg.data.image_size} must be a multiple of 4 for model.name=tiny "
                        "(the VAE halves it and the UNet halves the latent once more)")
    elif cfg.model.name != "tiny" and cfg.data.image_size % 8:
        problems.append(f"data.image_size={cfg.data.image_size} must be a multiple of 8 (the Stable Diffusion VAE's factor)")
    if cfg.data.source == "synthetic" and cfg.data.profile == "custom":
        from pogdiff.data.synthetic import MAX_IDENTITIES

        if (ids := cfg.data.majority_ids + cfg.data.minority_ids) > MAX_IDENTITIES:
            problems.append(f"data.majority_ids + data.minority_ids = {ids}: the synthetic generator names at most "
                            f"{MAX_IDENTITIES} distinct identities; use fewer identities with more images each")
    from pogdiff.data.synthetic import PROFILES

    if cfg.data.profile != "custom" and cfg.data.profile not in PROFILES:
        problems.append(f"data.profile='{cfg.data.profile}' is not one of {', '.join(sorted(PROFILES))} or custom "
                        "(with data.majority_ids, data.minority_ids, data.majority_images, data.minority_images)")
    if cfg.data.image_encoder not in ("tiny", "tiny-ssl") and not Path(cfg.data.image_encoder).expanduser().is_dir():
        problems.append(f"data.image_encoder='{cfg.data.image_encoder}' is not tiny, tiny-ssl nor a local directory "
                        "(a `pogdiff pretrain-encoder` output or a Hugging Face vision model saved with save_pretrained())")
    if cfg.data.names not in ("distinct", "grid", "pseudo"):
        problems.append(f"data.names must be distinct|grid|pseudo, got '{cfg.data.names}'")
    if cfg.train.prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        problems.append(f"train.prediction_type must be epsilon|v_prediction|sample (or null: the model's), "
                        f"got '{cfg.train.prediction_type}'")
    if cfg.train.mixed_precision.lower() == "false":  # YAML reads diffusers' `no` as false
        cfg.train.mixed_precision = "no"
    if cfg.train.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        problems.append(f"train.mixed_precision must be auto|no|fp16|bf16, got '{cfg.train.mixed_precision}'")
    if cfg.train.report_to not in ("tensorboard", "wandb", "all", "none"):
        problems.append(f"train.report_to must be tensorboard|wandb|all|none, got '{cfg.train.report_to}'")
    for key in ("num_train_epochs", "validation_epochs"):
        if getattr(cfg.train, key) is not None and getattr(cfg.train, key) < 1:
            problems.append(f"train.{key} must be >= 1 (or null), got {getattr(cfg.train, key)}")
    if cfg.data.max_train_samples is not None and cfg.data.max_train_samples < 1:
        problems.append(f"data.max_train_samples must be >= 1 (or null: all), got {cfg.data.max_train_samples}")
    if cfg.train.adapter not in ("none", "lora"):
        problems.append(f"train.adapter must be none|lora, got '{cfg.train.adapter}'")
    if cfg.train.lora_alpha is not None and cfg.train.lora_alpha <= 0:
        problems.append(f"train.lora_alpha must be > 0 (or null: train.lora_rank), got {cfg.train.lora_alpha}")
    if cfg.train.adapter == "lora" and not cfg.train.lora_target_modules:
        problems.append("train.lora_target_modules is empty: name the UNet modules to adapt (e.g. [to_q, to_k, to_v, to_out.0])")
    if cfg.train.resume not in ("auto", "never", "force"):
        problems.append(f"train.resume must be auto|never|force, got '{cfg.train.resume}'")
    if cfg.density.temperature is not None and not math.isfinite(cfg.density.temperature):
        problems.append("density.temperature must be finite (or null)")
    if cfg.method.k < 1:
        problems.append("method.k must be >= 1")
    if cfg.train.batch_size < 1:
        problems.append("train.batch_size must be >= 1")
    if cfg.train.loss_backend not in ("auto", "torch", "triton"):
        problems.append(f"train.loss_backend must be auto|torch|triton, got '{cfg.train.loss_backend}'")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        problems.append(f"train.device must be auto|cpu|cuda, got '{cfg.train.device}'")
    if cfg.density.device not in ("auto", "cpu", "cuda"):
        problems.append(f"density.device must be auto|cpu|cuda, got '{cfg.density.device}'")
    if cfg.density.temperature is not None and cfg.density.temperature <= 0:
        problems.append("density.temperature must be > 0 (or null: the spread of the training NLL)")
    if cfg.method.a3 <= 0:
        problems.append("method.a3 must be > 0")
    if cfg.sample.steps < 1 or cfg.sample.batch_size < 1:
        problems.append("sample.steps and sample.batch_size must be >= 1")
    if bad := [g for g in cfg.sample.guidance_scales if not (math.isfinite(g) and g > 0)]:
        problems.append(f"sample.guidance_scales must be positive finite numbers, got {bad}")
    if not -1.0 <= cfg.eval.grecall_threshold <= 1.0:
        problems.append(f"eval.grecall_threshold is a cosine similarity in [-1, 1], got {cfg.eval.grecall_threshold}")
    if unknown := [v for v in cfg.sweep.baselines if v not in VARIANTS or v.startswith("pogdiff")]:
        problems.append(f"sweep.baselines: {unknown} are not baselines; choose from vanilla, cbdm, t2h")
    if bad := [name for name in cfg.sweep.points if not re.fullmatch(r"[A-Za-z0-9_.-]+", name)]:
        problems.append(f"sweep.points: names {bad} must be letters, digits, '_', '.' or '-' (they name run folders)")
    unknown = [v for v in cfg.experiment.variants if v not in VARIANTS]
    if unknown:
        problems.append(f"experiment.variants: unknown {unknown}; choose from {list(VARIANTS)}")
    t, d = cfg.train, cfg.dist
    if t.grad_accum < 1:
        problems.append("train.grad_accum must be >= 1")
    if t.optimizer not in ("adamw", "adamw8bit"):
        problems.append(f"train.optimizer must be adamw|adamw8bit, got '{t.optimizer}'")
    if cfg.model.attention not in ("auto", "sdpa", "xformers"):
        problems.append(f"model.attention must be auto|sdpa|xformers, got '{cfg.model.attention}'")
    if not 0 < t.ema_decay < 1:
        problems.append("train.ema_decay must be in (0, 1)")
    if t.snr_gamma is not None and t.snr_gamma <= 0:
        problems.append("train.snr_gamma must be > 0 (or null for no Min-SNR weighting)")
    if t.noise_offset < 0 or t.lr_warmup_steps < 0 or t.checkpoint_keep < 1:
        problems.append("train.noise_offset and train.lr_warmup_steps must be >= 0, train.checkpoint_keep >= 1")
    if d.stop_timeout < d.start_timeout:
        problems.append(f"dist.stop_timeout={d.stop_timeout:g} must be >= dist.start_timeout={d.start_timeout:g} "
                        "(the watchdog names a waiting rank first, then stops the job)")
    if d.num_workers < 1 or d.zero_stage not in (0, 1, 2, 3):
        problems.append("dist.num_workers must be >= 1 and dist.zero_stage one of 0, 1, 2, 3")
    if cfg.prepare.backend not in ("ray", "serial"):
        hint = " ('process' was replaced by 'ray': the same pipeline on an embedded Ray cluster)" \
            if cfg.prepare.backend == "process" else ""
        problems.append(f"prepare.backend must be ray|serial, got '{cfg.prepare.backend}'{hint}")
    if cfg.prepare.precision not in ("auto", "bf16", "fp16", "fp32"):
        problems.append(f"prepare.precision must be auto|bf16|fp16|fp32, got '{cfg.prepare.precision}'")
    if cfg.prepare.gpus_per_worker is not None and cfg.prepare.gpus_per_worker < 0:
        problems.append(f"prepare.gpus_per_worker must be >= 0 (or null: from the cluster), got {cfg.prepare.gpus_per_worker}")
    if cfg.prepare.samples_per_shard < 1 or cfg.prepare.max_shard_bytes < 1 or cfg.prepare.workers < 0:
        problems.append("prepare.samples_per_shard and prepare.max_shard_bytes must be >= 1, prepare.workers >= 0 "
                        "(0: from the cluster)")
    if cfg.eval.encoder in ("tiny", cfg.data.image_encoder):
        problems.append(f"eval.encoder='{cfg.eval.encoder}' is the neighbours' image encoder (data.image_encoder); the "
                        "metrics need independent features: use 'recognizer' or another local HF vision model")
    from diffusers.optimization import SchedulerType

    if t.lr_scheduler not in {s.value for s in SchedulerType}:
        problems.append(f"train.lr_scheduler='{t.lr_scheduler}' is not one of diffusers' schedules: "
                        + ", ".join(s.value for s in SchedulerType))
    if cfg.data.dataloader_num_workers < 0 or cfg.data.shuffle_buffer < 1:
        problems.append("data.dataloader_num_workers must be >= 0 and data.shuffle_buffer >= 1")
    if cfg.data.heldout_images < 0 or cfg.data.minority_images < 1:
        problems.append("data.heldout_images must be >= 0 and data.minority_images >= 1")
    ic = cfg.index
    problems += [f"index.{name} must be >= {low}" for name, low in
                 (("shards", 0), ("nprobe", 1), ("batch_size", 1), ("nlist", 0), ("train_size", 0), ("pq_m", 0),
                  ("recall_sample", 0), ("flat_max", 0), ("cpus_per_shard", 0), ("memory_gb", 0)) if getattr(ic, name) < low]
    if ic.gpus_per_shard is not None and (ic.gpus_per_shard < 0 or ic.gpus_per_shard > 1 and ic.gpus_per_shard % 1):
        problems.append(f"index.gpus_per_shard must be a whole number or in [0, 1] (Ray's GPU quantities), "
                        f"or null for the nodes' split; got {ic.gpus_per_shard:g}")
    problems += _storage_problems(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


# Where object storage may be named, and the package that reads each protocol (pip install <package>).
URI_KEYS = ("data.source", "prepare.output", "dist.storage_path")
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs (pip install 'pogdiff[gcs]')",
                     "gcs": "gcsfs (pip install 'pogdiff[gcs]')"}


def _storage_problems(cfg: Config) -> list[str]:
    """URIs of a protocol fsspec knows (a trailing "/" is dropped); storage.options keyed by such
    protocols. Whether its package is installed here is the storage preflight's (pogdiff.storage)."""
    uris = {key: _value(cfg, key).rstrip("/") for key in URI_KEYS if _value(cfg, key) and "://" in _value(cfg, key)}
    for key, uri in uris.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, uri)
    if not uris and not cfg.storage.options:
        return []
    import fsspec

    known = set(fsspec.available_protocols())
    problems = [f"storage.options.{name}: '{name}' is not an fsspec protocol (e.g. s3, gs)"
                 for name in cfg.storage.options if name not in known]
    for key, uri in uris.items():
        proto = uri.split("://", 1)[0]
        if proto not in known:
            problems.append(f"{key}='{uri}': '{proto}://' is not a protocol fsspec knows (e.g. s3://, gs://)")
    return problems


def variant_config(cfg: Config, variant: str, seed: int) -> Config:
    """``cfg`` with the experiment variant's method settings and training seed ``seed``."""
    import dataclasses

    if variant not in VARIANTS:
        raise ConfigError(f"unknown experiment variant '{variant}'; choose from {list(VARIANTS)}")
    overrides = {"psi_img": True, "psi_inv": True, **VARIANTS[variant]}
    overrides["name"] = Method(overrides["name"])
    method = dataclasses.replace(cfg.method, **overrides)
    # The sampling noise of the run: its own per training seed, the same for every variant of that seed
    # (paired comparisons), so an experiment's seeds are independent draws of the sampling noise too.
    # sample.seed itself is kept: it draws sample.few_ids, which must be the same in every run.
    sample = dataclasses.replace(cfg.sample, noise_seed=derive_seed(cfg.sample.seed, seed))
    return dataclasses.replace(cfg, method=method, train=dataclasses.replace(cfg.train, seed=seed), sample=sample)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
