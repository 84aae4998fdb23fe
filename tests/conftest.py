"""Shared fixtures: the bundled real records, one short training run and its exported store."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.config import DEFAULT_DATA_DIR, ApplianceConfig, DataConfig, TrainConfig
from appliance.dataset import Dataset, ingest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MITDB = SHARED_DATA / "mitdb"
WFDB_FORMATS = SHARED_DATA / "wfdb-formats"

# One short run, shared by every test that needs a trained model: three epochs over at most
# 2500 beats per class, about 60 steps an epoch (an estimate: a few minutes on 2 idle cores).
# The time budget is far above that, so that the epochs alone end training and the weights do
# not depend on the machine's load.
FIXTURE_TRAIN = TrainConfig(
    max_epochs=3, max_minutes=60.0, max_beats_per_class=2500, checkpoint_every_steps=1000, seed=0
)


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("appliance").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real records shared by the project (MIT-BIH and other WFDB formats)."""
    if not MITDB.exists():
        pytest.fail(f"real records not found at {MITDB}; the tests read ../shared/data/mitdb")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixture_config() -> ApplianceConfig:
    return ApplianceConfig(data=DataConfig(), train=FIXTURE_TRAIN)


@pytest.fixture(scope="session")
def default_dataset(fixture_config: ApplianceConfig) -> Dataset:
    """The bundled default records, ingested and split by record."""
    return ingest(DEFAULT_DATA_DIR, fixture_config.data)


@pytest.fixture(scope="session")
def split_train(default_dataset: Dataset):  # noqa: ANN201
    """(fit, hold-out) beats of the bundled training records (``appliance.dataset.BeatSet``)."""
    from appliance.holdout import split_holdout

    return split_holdout(default_dataset.splits["train"])


@pytest.fixture(scope="session")
def trained_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Work folder of ``trained_result``, with its ``best.pt`` once that fixture has run."""
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def trained_result(
    fixture_config: ApplianceConfig,
    default_dataset: Dataset,
    split_train,
    trained_work_dir: Path,
):  # noqa: ANN201
    """A flow trained briefly on the bundled records (``appliance.train.TrainResult``)."""
    from appliance.train import train

    work_dir = trained_work_dir
    return train(
        fixture_config,
        split_train[0],
        default_dataset.splits["validation"],
        work_dir,
        resume=False,
        progress=False,
    )


@pytest.fixture(scope="session")
def model_store(
    fixture_config: ApplianceConfig,
    default_dataset: Dataset,
    split_train,
    trained_result,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A model store holding the exported fixture model as its current version."""
    from appliance.export import export_model
    from appliance.holdout import concatenate
    from appliance.jobs import data_facts, read_other_lead_beats, train_records

    store = tmp_path_factory.mktemp("store")
    export_model(
        fixture_config,
        trained_result,
        split_train[0],
        concatenate(default_dataset.splits["validation"], split_train[1]),
        store,
        data_facts(default_dataset),
        other_lead_beats=read_other_lead_beats(
            DEFAULT_DATA_DIR,
            train_records(default_dataset),
            fixture_config.data,
            fixture_config.train.seed,
        ),
    )
    return store


@pytest.fixture(scope="session")
def server_address(model_store: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``127.0.0.1:PORT`` of a ``python -m appliance serve`` process on the fixture store."""
    from appliance.pipeline import ServerProcess

    server = ServerProcess(model_store, tmp_path_factory.mktemp("server"))
    try:
        yield server.wait_serving()
    finally:
        server.stop()
