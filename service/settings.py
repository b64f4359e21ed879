"""The one settings object of the gateway (``DFLARE_*`` environment variables, optional config file).

Every knob of the gateway, its backends, routing and security lives here, so the Helm chart, the CLI
and the tests agree on one set of names. Lists accept JSON or a comma-separated string
(``DFLARE_BACKENDS=http://a:30000,http://b:30000``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_FILE_ENV = "DFLARE_CONFIG_FILE"

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Gateway settings. Defaults are the documented production defaults."""

    model_config = SettingsConfigDict(env_prefix="DFLARE_", extra="ignore", env_ignore_empty=True)

    # --- listening ---
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1, description="uvicorn worker processes")

    # --- backends ---
    backends: CommaList = Field(
        default_factory=list,
        description="SGLang (or engine-server) base URLs; empty and no discovery = embedded engine",
    )
    embedded_model: str = Field("dflare-demo", description="model name the embedded engine serves")
    embedded_drafter: Literal["dflare", "dflash", "none"] = "dflare"
    embedded_block_size: int | None = Field(
        None, ge=1, le=64, description="speculative block size; unset = the drafter's own"
    )
    embedded_min_draft_confidence: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="a fixed adaptive draft length threshold instead of the verify-width policy (0 = verify "
        "the whole block, 0.02 = the CPU threshold); unset = the policy on CPU",
    )
    embedded_verify_policy: bool | None = Field(
        None,
        description="choose verify widths (or plain decode steps) with the verify-width policy: a cost "
        "profile measured at start and corrected by the engine's steps, acceptance calibrated online; "
        "false = the fixed threshold (0.02 on CPU); unset = the policy on CPU unless a threshold is set",
    )
    embedded_max_batch: int = Field(8, ge=1)
    embedded_queue_size: int = Field(64, ge=1, description="queued requests before 429")
    embedded_threads: int = Field(0, ge=0, description="torch threads; 0 = torch default")
    embedded_target_dir: Path | None = Field(None, description="target model dir; unset = the demo target")
    embedded_drafter_dir: Path | None = Field(
        None, description="drafter dir; unset = the demo drafter of kind embedded_drafter"
    )

    # --- discovery (Kubernetes) ---
    discovery_enabled: bool = False
    discovery_namespace: str = "default"
    discovery_label_selector: str = "app.kubernetes.io/component=engine"
    discovery_port_annotation: str = "dflare.ai/port"
    discovery_port: int = 30000
    discovery_kubeconfig: Path | None = Field(
        None, description="kubeconfig file; unset = in-cluster service account, else $KUBECONFIG"
    )
    backend_api_key: SecretStr | None = Field(
        None,
        description="sent upstream as 'Authorization: Bearer <key>' (SGLang --api-key); unset = none",
    )

    # --- routing and health ---
    routing_policy: Literal["least_outstanding", "prefix_affinity", "round_robin"] = "least_outstanding"
    health_interval_s: float = Field(5.0, gt=0)
    health_fail_threshold: int = Field(3, ge=1)
    health_success_threshold: int = Field(1, ge=1)
    retry_max_attempts: int = Field(3, ge=1)
    retry_backoff_base_s: float = Field(0.05, ge=0)
    retry_backoff_max_s: float = Field(2.0, ge=0)
    breaker_failure_threshold: int = Field(5, ge=1, description="consecutive request failures that open it")
    breaker_cooldown_s: float = Field(5.0, gt=0, description="open time before a half-open trial")

    # --- timeouts (seconds) ---
    connect_timeout_s: float = Field(5.0, gt=0)
    first_token_timeout_s: float = Field(120.0, gt=0)
    idle_stream_timeout_s: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    # --- limits ---
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_in_flight: int = Field(256, ge=1, description="per gateway process (per uvicorn worker)")

    # --- security ---
    api_keys: CommaList = Field(default_factory=list)
    api_keys_file: Path | None = Field(
        None, description="one key per line; re-read when it changes (a rotated Kubernetes Secret)"
    )
    api_keys_reload_s: float = Field(
        5.0, ge=0, description="how often the keys files are checked for changes; 0 = read once"
    )
    metrics_require_auth: bool = False
    metrics_tokens_file: Path | None = Field(
        None, description="tokens accepted on /metrics only (a scraper's credential, not an API key)"
    )
    cors_origins: CommaList = Field(default_factory=list)

    # --- logging ---
    log_level: str = "info"
    log_prompts: bool = Field(False, description="include prompt/completion text in access logs")
    access_log: bool = Field(True, description="one JSON line per API request on logger dflare.access")

    @field_validator("backends", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def uses_embedded_engine(self) -> bool:
        return not self.backends and not self.discovery_enabled

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments > env > config file (YAML or JSON) named by DFLARE_CONFIG_FILE."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings, read once; tests build ``Settings(...)`` directly instead."""
    return Settings()
