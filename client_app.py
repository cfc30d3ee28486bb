"""Flower ClientApp: local training for the method the server runs, and the node's partition id
when the server asks (see fedhpro_flwr.app.client)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedhpro_flwr.app.client import handle_query, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)
