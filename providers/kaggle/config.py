"""The ``providers.kaggle`` section of the pool configuration."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gpupool.durations import Seconds

KAGGLE_CAP_SECONDS = 12 * 3600  # Kaggle's hard limit for a GPU session


class KaggleConfig(BaseModel):
    """Settings of the Kaggle provider; every field has a default that suits a free account.

    ``enable_internet`` defaults to True (the kaggle client's own default) because an
    experiment's ``setup`` usually pip-installs something; set it to false for experiments
    whose code needs nothing beyond Kaggle's image, so a session cannot reach the network.
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    username: str | None = Field(None, description="the Kaggle user; default: from the credentials")
    credentials: Path | None = Field(None, description="a kaggle.json to use instead of the usual places")
    accelerator: str | None = Field("NvidiaTeslaT4", description="machine_shape; null: CPU only")
    enable_internet: bool = True
    public: bool = Field(False, description="make kernels and datasets public (never by default)")
    session_seconds: Seconds = Field(9 * 3600, gt=0, le=KAGGLE_CAP_SECONDS,
                                   description="plan sessions this long (Kaggle cuts at 12 h)")
    deadline_margin: Seconds | None = Field(None, ge=0, description="stop this long before the end")
    max_concurrent: int = Field(2, ge=1, description="Kaggle runs 2 GPU sessions at a time")
    weekly_gpu_hours: float = Field(30.0, gt=0, description="quota assumed when the API fails")
    request_timeout: Seconds = Field(60.0, gt=0, description="seconds per HTTP request")
    download_timeout: Seconds = Field(300.0, gt=0, description="seconds of silence in a download")
    max_retries: int = Field(5, ge=0)
    backoff_base: Seconds = Field(1.0, ge=0, description="first retry delay; doubles each time")
    backoff_max: Seconds = Field(60.0, ge=0)
    dataset_ready_timeout: Seconds = Field(600.0, gt=0, description="seconds a new dataset may "
                                         "take to read READY (404 until then is not-ready-yet)")
    push_settle_seconds: Seconds = Field(300.0, gt=0, description="seconds to keep asking whether "
                                       "a push that got no clear answer started a kernel")
    dataset_poll_seconds: Seconds = Field(5.0, ge=0)
    slug_prefix: str = Field("gpupool", pattern=r"^[a-z0-9][a-z0-9-]{0,19}$")
    keep_remote_objects: bool = Field(False, description="keep each attempt's kernel and inputs "
                                      "dataset on Kaggle after collecting it (they use your "
                                      "private storage); default: delete them")
    startup_seconds: Seconds = Field(180.0, ge=0, description="queue and image start, for planning")

    @property
    def margin(self) -> float:
        if self.deadline_margin is not None:
            return self.deadline_margin
        return min(900.0, 0.1 * self.session_seconds)
