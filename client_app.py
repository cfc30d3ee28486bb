"""Flower ClientApp: local training for the method the server runs (see fedhpro_flwr.app.client)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedhpro_flwr.app.client import handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
