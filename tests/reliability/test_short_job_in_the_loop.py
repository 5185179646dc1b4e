"""Continuous batching through the real worker (`python -m server` in RunPod's production loop, testing.runpod_fake):
a short job that arrives while four long jobs decode joins the running batch, is vocoded as soon as it finishes,
and completes in less than half the long jobs' median latency. Every job succeeds."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from testing.runpod_fake import COMPLETED, FakeRunPod
from testing.runpod_worker import RUN_TIMEOUT_S, put_reference, start_worker, worker_env

pytestmark = pytest.mark.slow

LONG_TEXTS = [
    "Esta é a primeira mensagem longa do teste, com frases suficientes para manter o lote ocupado durante vários "
    "segundos. Ela fala de nada em particular, apenas ocupa o motor enquanto outra tarefa chega depois dela.",
    "A segunda mensagem longa também tem várias frases. Ela conta uma pequena história sem importância, sobre um "
    "dia comum, uma caminhada curta e um café tomado sem pressa numa manhã fria de inverno, perto do rio grande.",
    "Terceira mensagem longa: um parágrafo para o lote, com vírgulas, pontos e palavras comuns, que o servidor "
    "divide em segmentos antes de decodificar. Cada segmento vira uma linha do lote contínuo, como as outras, até o fim.",
    "Quarta e última mensagem longa deste teste, escrita para durar. Ela repete a ideia das anteriores com outras "
    "palavras, para que os comprimentos sejam diferentes e as linhas terminem em passos diferentes do lote, sim.",
]
SHORT_TEXT = "Oi! Uma resposta curta, por favor."


def job(ref: str, text: str, seed: int) -> dict:
    return {"gen_text": text, "ref_audio_url": ref, "voice_id": "voz", "language": "pt", "seed": seed}


async def test_a_short_job_is_not_held_behind_long_ones(tmp_path):
    assert all(200 <= len(t) <= 250 for t in LONG_TEXTS) and len({len(t) for t in LONG_TEXTS}) == 4
    assert len(SHORT_TEXT) <= 60
    async with FakeRunPod() as fake:
        ref = put_reference(tmp_path, "voz.wav")
        env = worker_env(fake, tmp_path, MAX_CONCURRENCY="16", MAX_BATCH_SIZE="16", BATCH_WAIT_MS="200")
        worker = await start_worker(fake, env, tmp_path / "worker.log")
        try:
            longs = fake.enqueue_many(job(ref, t, i) for i, t in enumerate(LONG_TEXTS))
            taken = await fake.wait_until(lambda: all(fake.jobs[i].taken_at is not None for i in longs), 60)
            assert taken, worker.log_text()[-3000:]
            await asyncio.sleep(1.0)
            short = fake.enqueue(job(ref, SHORT_TEXT, 99))
            assert await fake.wait_done([*longs, short], RUN_TIMEOUT_S), worker.log_text()[-3000:]
        finally:
            await worker.stop(5)
    assert all(fake.jobs[i].state == COMPLETED for i in [*longs, short]), {i: fake.jobs[i].result for i in longs}
    latency = {i: fake.jobs[i].done_at - fake.jobs[i].enqueued_at for i in [*longs, short]}
    long_median = statistics.median(latency[i] for i in longs)
    print(f"\nshort job {latency[short]:.1f} s; long jobs {sorted(round(latency[i], 1) for i in longs)} s "
          f"(median {long_median:.1f} s)")  # fmt: skip
    assert latency[short] < 0.5 * long_median
