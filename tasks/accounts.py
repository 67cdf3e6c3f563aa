"""Binds the accounts boundary's handlers to the bus."""
from adapters.repositories import SqlUserRepository
from handlers import accounts
from handlers.messages import RegisterUser
from project import bus

bus.provide("users", lambda uow: SqlUserRepository(uow.session))
register_user = bus.command(RegisterUser)(accounts.register_user)
