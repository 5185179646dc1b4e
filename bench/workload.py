"""The work a load run offers: which texts, in which languages, for which voices, and when.

Everything here is pure Python and deterministic: the same seed and settings give the same jobs, in the same
order, on any machine, so two runs (and the two configurations of one run) offer exactly the same work.

- Voices: `voices` reference voices, drawn with a Zipf skew (P(voice k) ~ 1 / k**s, k = 1..voices): a few hot
  voices take most jobs, the rest form a long tail. s = 0 is uniform.
- Texts: a mixture of length classes, as a voice API sees them: short replies ("Olá! Tudo bem?"), single
  sentences, and paragraphs of 2-5 sentences cut to `max_chars`. A profile gives the class weights; the
  `paragraphs` profile (narration, what streaming is for) fills each paragraph with sentences up to `max_chars`.
- Languages: a weighted mix (default weighted toward Portuguese, the seed's default language).
- Each job carries its own sampling seed, so a job's audio does not depend on what it is batched with.
- Open loop: Poisson arrivals (exponential gaps) at a given rate, from the same seed.
- Load points: a closed-loop concurrency or an open-loop rate, each with its own seeded job stream (`plan_points`),
  plus the unmeasured warm-up jobs on a voice outside the workload (`warmup_jobs`).
"""

from __future__ import annotations

import bisect
import itertools
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

# --------------------------------------------------------------------------------------------- text corpus
# Short replies (a chat or IVR turn) and single sentences (a notice, an answer) per language. Paragraphs are
# made of 2-5 sentences of the same language.
REPLIES: dict[str, list[str]] = {
    "pt": ["Sim, claro.", "Olá! Tudo bem?", "Obrigado pela paciência.", "Perfeito, pode deixar.",
           "Um momento, por favor.", "Bom dia! Como posso ajudar?", "Entendi. Vou verificar.",
           "Tudo certo por aqui.", "Até logo!", "Pedido confirmado."],
    "en": ["Sure, no problem.", "Hello there!", "Thanks for waiting.", "Got it, one moment.",
           "Yes, that works for me.", "Good morning! How can I help?", "Let me check that for you.",
           "All set.", "See you soon!", "Your order is confirmed."],
    "es": ["Sí, claro.", "¡Hola! ¿Qué tal?", "Gracias por esperar.", "Perfecto, un momento.",
           "¡Buenos días! ¿En qué puedo ayudarle?", "Lo reviso ahora mismo.", "Todo listo.", "¡Hasta pronto!"],
    "fr": ["Oui, bien sûr.", "Bonjour ! Ça va ?", "Merci de patienter.", "Parfait, un instant.",
           "Je vérifie tout de suite.", "C'est noté.", "À bientôt !"],
    "de": ["Ja, natürlich.", "Hallo! Wie geht's?", "Danke fürs Warten.", "Einen Moment, bitte.",
           "Ich sehe gleich nach.", "Alles erledigt.", "Bis bald!"],
    "it": ["Sì, certo.", "Ciao! Come va?", "Grazie per l'attesa.", "Un attimo, per favore.",
           "Controllo subito.", "Tutto pronto.", "A presto!"],
}
SENTENCES: dict[str, list[str]] = {
    "pt": ["Sua consulta foi confirmada para amanhã às dez horas.",
           "O pagamento foi aprovado e o recibo já está no seu e-mail.",
           "Obrigado por ligar. Um atendente vai falar com você em instantes.",
           "A entrega está prevista para quinta-feira, entre nove e dezoito horas.",
           "Para sua segurança, nunca compartilhe sua senha com ninguém.",
           "O voo das sete foi remarcado para as nove e quinze.",
           "Você tem três mensagens novas e um lembrete para hoje à tarde.",
           "A temperatura deve cair durante a noite, com chance de chuva leve.",
           "Seu plano foi renovado automaticamente por mais doze meses.",
           "Se preferir, posso enviar o resumo da conversa por mensagem."],
    "en": ["Your package has shipped and should arrive on Thursday.",
           "The meeting has been moved to three o'clock in the main room.",
           "Thanks for waiting; I found three flights that match your dates.",
           "Your balance is two hundred and forty dollars as of this morning.",
           "Please have your account number ready before the call.",
           "The store closes at nine tonight and opens at eight tomorrow.",
           "I've added the appointment to your calendar and set a reminder.",
           "Traffic is light, so the drive should take about twenty minutes.",
           "Your subscription renews next month unless you cancel it before then.",
           "If anything else comes up, just reply to this message."],
    "es": ["La reunión se ha movido al jueves por la tarde.",
           "Su pedido llegará mañana entre las nueve y las dos.",
           "Gracias por llamar; en breve le atenderá uno de nuestros agentes.",
           "El pago se ha procesado correctamente y recibirá un correo de confirmación.",
           "Recuerde que la oficina permanece cerrada los domingos.",
           "Hemos actualizado su dirección de entrega según lo solicitado.",
           "El próximo tren a Madrid sale en quince minutos desde el andén dos."],
    "fr": ["Votre commande est prête et vous attend au comptoir.",
           "Le rendez-vous est confirmé pour lundi à quatorze heures.",
           "Merci de votre appel, un conseiller va vous répondre dans un instant.",
           "Le train de dix heures a environ vingt minutes de retard.",
           "Votre mot de passe a été modifié avec succès ce matin.",
           "Nous vous enverrons un rappel la veille de votre visite."],
    "de": ["Ihre Bestellung wurde heute Morgen verschickt.",
           "Der Termin ist für Montag um vierzehn Uhr bestätigt.",
           "Vielen Dank für Ihren Anruf, gleich ist jemand für Sie da.",
           "Der Zug nach Berlin hat etwa zehn Minuten Verspätung.",
           "Ihr Konto wurde erfolgreich aktualisiert.",
           "Bitte halten Sie Ihre Kundennummer bereit."],
    "it": ["Il suo ordine è stato spedito e arriverà giovedì.",
           "L'appuntamento è confermato per lunedì alle quattordici.",
           "Grazie per aver chiamato, un operatore risponderà a breve.",
           "Il treno per Roma parte dal binario tre tra dieci minuti.",
           "Il pagamento è andato a buon fine, riceverà una ricevuta via email.",
           "Le ricordiamo che gli uffici sono chiusi la domenica."],
}
LANGUAGES: tuple[str, ...] = tuple(REPLIES)

# Length classes and the profiles that weight them.
LENGTH_CLASSES: tuple[str, ...] = ("reply", "sentence", "paragraph")
PROFILES: dict[str, dict[str, float]] = {
    # Chat / IVR turns: mostly short replies. The default: keeps a CPU run's total audio modest.
    "short": {"reply": 0.80, "sentence": 0.18, "paragraph": 0.02},
    "mixed": {"reply": 0.45, "sentence": 0.40, "paragraph": 0.15},
    # Narration: paragraphs dominate.
    "long": {"reply": 0.15, "sentence": 0.45, "paragraph": 0.40},
    # Paragraphs only, each filled with sentences up to --max-chars (FILLED_PROFILES): what streaming is for.
    "paragraphs": {"reply": 0.0, "sentence": 0.0, "paragraph": 1.0},
}
DEFAULT_LANGUAGE_MIX: dict[str, float] = {"pt": 0.35, "en": 0.30, "es": 0.15, "fr": 0.08, "de": 0.07, "it": 0.05}
PARAGRAPH_SENTENCES = (2, 5)  # inclusive range
# Profiles whose paragraphs take sentences (the language's pool in a shuffled order, again when it runs out)
# until the next would pass max_chars: --max-chars 400 gives 340-400 characters in every language.
FILLED_PROFILES = frozenset({"paragraphs"})


@dataclass(frozen=True)
class JobSpec:
    """One job of the workload: what to say, in which language, with which voice."""

    index: int
    text: str
    language: str
    voice: int  # 0-based voice number; voice 0 is the hottest
    length_class: str
    seed: int  # the job's sampling seed (sent as the request's `seed`)

    @property
    def chars(self) -> int:
        return len(self.text)

    def to_input(self, ref_url_template: str, voice_id_template: str = "bench-voice-{voice:03d}") -> dict[str, Any]:
        """The job's RunPod input: the seed's payload (plus `seed`)."""
        return {
            "gen_text": self.text,
            "ref_audio_url": ref_url_template.format(voice=self.voice),
            "voice_id": voice_id_template.format(voice=self.voice),
            "language": self.language,
            "temperature": 0.75,
            "speed": 1.0,
            "top_k": 50,
            "top_p": 0.85,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class WorkloadSpec:
    """The settings a workload is drawn from (recorded in the report)."""

    seed: int = 0
    voices: int = 8
    zipf_s: float = 1.1
    profile: str = "short"
    max_chars: int = 120
    languages: tuple[tuple[str, float], ...] = tuple(DEFAULT_LANGUAGE_MIX.items())

    def __post_init__(self) -> None:
        if self.voices < 1:
            raise ValueError(f"voices must be >= 1, got {self.voices}")
        if self.zipf_s < 0:
            raise ValueError(f"zipf exponent must be >= 0, got {self.zipf_s}")
        if self.profile not in PROFILES:
            raise ValueError(f"text profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.max_chars < 20:
            raise ValueError(f"max_chars must be >= 20, got {self.max_chars}")
        if not self.languages:
            raise ValueError("the language mix is empty")
        for lang, weight in self.languages:
            if lang not in REPLIES:
                raise ValueError(f"no texts for language {lang!r}; have {', '.join(LANGUAGES)}")
            if weight < 0:
                raise ValueError(f"language weight must be >= 0, got {lang}:{weight}")
        if sum(w for _, w in self.languages) <= 0:
            raise ValueError("the language weights sum to 0")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["languages"] = dict(self.languages)
        data["profile_weights"] = PROFILES[self.profile]
        return data


def parse_language_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`pt:0.4,en:0.3,es` -> ((pt, 0.4), (en, 0.3), (es, 1.0)); a language without weight counts 1."""
    mix = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lang, _, weight = part.partition(":")
        try:
            mix.append((lang.strip().lower(), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"bad language weight in {part!r} (want LANG[:WEIGHT])") from None
    return tuple(mix)


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf probabilities of ranks 1..n with exponent s."""
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _weighted(rng: random.Random, items: Sequence[Any], cum_weights: Sequence[float]) -> Any:
    x = rng.random() * cum_weights[-1]
    return items[bisect.bisect_right(cum_weights, x)] if x < cum_weights[-1] else items[-1]


def _paragraph(rng: random.Random, language: str, max_chars: int, fill: bool = False) -> str:
    pool = SENTENCES[language]
    if fill:
        picked: list[str] = []
        while True:
            for sentence in rng.sample(pool, len(pool)):
                if len(" ".join([*picked, sentence])) > max_chars:
                    return " ".join(picked) if picked else sentence[:max_chars]
                picked.append(sentence)
    count = rng.randint(*PARAGRAPH_SENTENCES)
    picked = rng.sample(pool, min(count, len(pool)))
    text = " ".join(picked)
    while len(text) > max_chars and len(picked) > 1:  # cut at a sentence boundary
        picked.pop()
        text = " ".join(picked)
    return text[:max_chars]


def make_jobs(spec: WorkloadSpec, n: int, stream: str = "jobs") -> list[JobSpec]:
    """`n` jobs drawn from `spec`; `stream` names an independent stream of the same seed (one per load point).

    The same (spec, n, stream) always gives the same list. Seeding with a string is stable across processes
    (random.seed hashes it with SHA-512, not with Python's randomised hash).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{spec.seed}:{stream}")
    voices = list(range(spec.voices))
    voice_cum = list(itertools.accumulate(zipf_weights(spec.voices, spec.zipf_s)))
    langs = [lang for lang, _ in spec.languages]
    lang_cum = list(itertools.accumulate(w for _, w in spec.languages))
    classes = list(LENGTH_CLASSES)
    class_cum = list(itertools.accumulate(PROFILES[spec.profile][c] for c in classes))
    jobs = []
    for i in range(n):
        voice = _weighted(rng, voices, voice_cum)
        language = _weighted(rng, langs, lang_cum)
        length_class = _weighted(rng, classes, class_cum)
        if length_class == "reply":
            text = rng.choice(REPLIES[language])
        elif length_class == "sentence":
            text = rng.choice(SENTENCES[language])
        else:
            text = _paragraph(rng, language, spec.max_chars, spec.profile in FILLED_PROFILES)
        text = text[: spec.max_chars]
        jobs.append(JobSpec(i, text, language, voice, length_class, rng.randrange(1 << 31)))
    return jobs


def poisson_arrivals(n: int, rate_per_s: float, seed: int | str, stream: str = "arrivals") -> list[float]:
    """Arrival offsets in seconds (first at 0) of a Poisson process with `rate_per_s`: exponential gaps."""
    if rate_per_s <= 0:
        raise ValueError(f"rate must be > 0, got {rate_per_s}")
    rng = random.Random(f"{seed}:{stream}")
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate_per_s)
        out.append(t)
    return out


def describe(jobs: Sequence[JobSpec]) -> dict[str, Any]:
    """What a list of jobs contains: sizes, length classes, languages, voice skew (for the report)."""
    if not jobs:
        return {"jobs": 0}
    chars = sorted(j.chars for j in jobs)
    voices = Counter(j.voice for j in jobs)
    hottest = voices.most_common(1)[0][1]
    return {
        "jobs": len(jobs),
        "chars_total": sum(chars),
        "chars_mean": round(statistics.fmean(chars), 1),
        "chars_median": statistics.median(chars),
        "chars_max": chars[-1],
        "length_classes": dict(sorted(Counter(j.length_class for j in jobs).items())),
        "languages": dict(Counter(j.language for j in jobs).most_common()),
        "distinct_voices": len(voices),
        "hottest_voice_share": round(hottest / len(jobs), 3),
        "voice_counts": {str(k): v for k, v in sorted(voices.items())},
    }


def split_gs_url(url: str) -> tuple[str, str]:
    """`gs://bucket/object` -> (bucket, object); ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "gs" or not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"want gs://bucket/object, got {url!r}")
    return parts.netloc, parts.path.lstrip("/")


# ------------------------------------------------------------------------------------------- load points


@dataclass
class PointPlan:
    mode: str  # "closed" | "open" | "soak"
    jobs: list[JobSpec]
    concurrency: int | None = None
    rate: float | None = None  # jobs/s, open loop
    arrivals: list[float] | None = None

    @property
    def label(self) -> str:
        if self.mode == "open":
            return f"open@{self.rate:g}/s"
        return f"{self.mode}@c{self.concurrency}"


def plan_points(spec: WorkloadSpec, jobs_per_point: int, concurrencies: Sequence[int],
                rates: Sequence[float]) -> list[PointPlan]:  # fmt: skip
    """The load points of a run, each with its own seeded job stream (the same for every configuration).

    A closed-loop point gets at least `concurrency` jobs: with fewer, its clients could never all be busy."""
    points = [PointPlan("closed", make_jobs(spec, max(jobs_per_point, c), f"closed-c{c}"), concurrency=c)
              for c in concurrencies]  # fmt: skip
    for r in rates:
        points.append(PointPlan("open", make_jobs(spec, jobs_per_point, f"open-r{r:g}"), rate=r,
                                arrivals=poisson_arrivals(jobs_per_point, r, spec.seed, f"arrivals-r{r:g}")))
    return points


def warmup_jobs(count: int, warm_voice: int) -> list[JobSpec]:
    """Short jobs on a voice outside the workload, so they warm the worker without touching its caches' counts
    for the measured voices."""
    texts = [(REPLIES["pt"][1], "pt"), (REPLIES["en"][1], "en")]
    return [JobSpec(10_000 + i, *texts[i % 2], warm_voice, "reply", 1000 + i) for i in range(count)]
