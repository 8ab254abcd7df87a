"""POST /v1/chat/completions (in progress)."""

from fastapi import APIRouter

router = APIRouter()
