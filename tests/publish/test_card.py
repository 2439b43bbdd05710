"""The model card's settings table names the loss and the options switched on, nothing else."""

from mmcl.config import Config
from mmcl.publish.card import _settings_table


def settings(**loss):
    config = Config().to_dict()
    config["loss"].update(loss)
    return _settings_table(config)


def test_the_card_names_the_loss_and_its_switched_on_options():
    plain = settings()
    assert "| `loss.name` | clip |" in plain
    assert "loss.queue_size" not in plain and "loss.momentum" not in plain and "loss.cache_chunk" not in plain
    assert "loss.init_logit_bias" not in plain and "data.batch_sampler" not in plain
    assert "loss.byol_momentum" not in plain and "loss.swav_prototypes" not in plain
    rich = settings(name="siglip", queue_size=4096, momentum=0.99, cache_chunk=32, image_ssl_weight=1.0,
                    hard_negative_column="hard_negatives", byol_weight=1.0, swav_weight=0.5, swav_queue_size=256)
    for row in ("| `loss.name` | siglip |", "| `loss.init_logit_bias` | -10.0 |", "| `loss.queue_size` | 4096 |",
                "| `loss.momentum` | 0.99 |", "| `loss.cache_chunk` | 32 |", "| `loss.image_ssl_weight` | 1.0 |",
                "| `loss.image_ssl_temperature` | 0.1 |", "| `loss.hard_negative_column` | hard_negatives |",
                "| `loss.byol_weight` | 1.0 |", "| `loss.byol_momentum` | 0.99 |", "| `loss.swav_weight` | 0.5 |",
                "| `loss.swav_prototypes` | 64 |", "| `loss.swav_epsilon` | 0.02 |", "| `loss.swav_queue_size` | 256 |"):
        assert row in rich, row
