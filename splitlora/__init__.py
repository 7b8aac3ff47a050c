"""splitlora: split-federated LoRA fine-tuning of large language models.

Roles (client, main server, fed server) are plain classes; the seven strategies (cenlora, fedlora, sl,
splitlora, dlora, hsplitlora, hetlora) are schedules over them; the in-process simulator and the
networked deployment differ only in transport.
"""

__version__ = "0.1.0"
