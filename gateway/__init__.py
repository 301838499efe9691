"""Stateless TCP chat gateways: accept line-protocol clients and relay one room through a broker."""
