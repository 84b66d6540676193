"""Page and confirmation-mail strings per language; German is the reference and the fallback.

`consent` is the form text a subscriber agrees to: it is stored with every consent event,
together with FORM_VERSION — change the version whenever a text changes (proof of consent).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FORM_VERSION = "2026-01"
RTL = frozenset({"ar", "fa", "he", "ur"})
LANGUAGE_NAMES = {"de": "Deutsch", "en": "English", "tr": "Türkçe", "ar": "العربية",
                  "pl": "Polski", "ru": "Русский", "uk": "Українська"}

STRINGS: dict[str, dict[str, str]] = {
    "de": {
        "tagline": "Integration mit aufrechtem Gang · Dortmund",
        "subscribe_title": "Newsletter abonnieren",
        "subscribe_intro": "Einladungen zu den Dortmunder Integrationskonferenzen, zu „Wir ALLE "
                           "sind Dortmund“, FORUM INTEGRATION und den interkulturellen "
                           "Straßenfesten – etwa einmal im Monat, kostenlos, jederzeit "
                           "abbestellbar.",
        "email": "E-Mail-Adresse",
        "name": "Name (freiwillig)",
        "language": "Sprache der E-Mails",
        "lists": "Was möchten Sie erhalten?",
        "consent": "Ja, ich möchte die ausgewählten E-Mails des Trägerkreises IMAG erhalten. Meine "
                   "Einwilligung kann ich jederzeit über den Link in jeder E-Mail widerrufen. "
                   "Gespeichert werden Adresse, Name, Sprache sowie Zeitpunkt und IP-Adresse der "
                   "Anmeldung als Nachweis.",
        "submit": "Anmelden",
        "thanks_title": "Fast geschafft",
        "thanks": "Wenn die Adresse E-Mails empfangen kann, haben wir gerade einen "
                  "Bestätigungslink dorthin geschickt. Erst wenn Sie ihn öffnen, sind Sie "
                  "angemeldet. Der Link gilt 7 Tage.",
        "confirmed_title": "Anmeldung bestätigt",
        "confirmed": "Vielen Dank! Sie erhalten ab jetzt unsere E-Mails. Abmelden können Sie sich "
                     "mit einem Klick in jeder E-Mail.",
        "already": "Diese Anmeldung ist bereits bestätigt. Sie müssen nichts weiter tun.",
        "unsubscribe_howto": "Diese Seite kennt Ihre Adresse nicht. Zum Abmelden nutzen Sie bitte "
                             "den Link „Abmelden“ in Ihrer eigenen E-Mail – er gilt nur für Ihre "
                             "Adresse. Oder schreiben Sie uns eine E-Mail mit dem Betreff "
                             "„Abmelden“.",
        "unsubscribe_mail": "E-Mail zum Abmelden schreiben",
        "confirm_title": "Anmeldung bestätigen",
        "confirm_ask": "Möchten Sie {email} für „{lists}“ anmelden? Erst der Knopf bestätigt die "
                       "Anmeldung.",
        "confirm_button": "Ja, Anmeldung bestätigen",
        "invalid_title": "Dieser Link funktioniert nicht",
        "invalid": "Der Link ist unvollständig, verändert oder abgelaufen. Es wurde nichts "
                   "geändert. Bitte melden Sie sich bei Bedarf erneut an.",
        "unsubscribe_title": "Abmelden",
        "unsubscribe_ask": "Möchten Sie {email} von dieser Liste abmelden: {list}?",
        "unsubscribe_button": "Ja, abmelden",
        "unsubscribed_title": "Sie sind abgemeldet",
        "unsubscribed": "{email} erhält keine E-Mails mehr von dieser Liste: {list}.",
        "preferences_title": "Einstellungen",
        "preferences_intro": "Einstellungen für {email}",
        "save": "Speichern",
        "saved": "Ihre Einstellungen sind gespeichert.",
        "unsubscribe_all": "Von allen Listen abmelden",
        "unsubscribed_all": "{email} erhält keine E-Mails des Trägerkreises IMAG mehr.",
        "preferences_link": "Einstellungen ändern",
        "err_email": "Bitte geben Sie eine gültige E-Mail-Adresse ein.",
        "err_name": "Der Name darf höchstens 100 Zeichen lang sein und keine Web- oder "
                    "E-Mail-Adressen, Zeilenumbrüche oder die Zeichen @ < > , ; : enthalten.",
        "err_language": "Bitte wählen Sie eine Sprache aus der Liste.",
        "err_lists": "Bitte wählen Sie mindestens eine Liste.",
        "err_form": "Das Formular ist abgelaufen. Bitte laden Sie die Seite neu und senden Sie "
                    "es noch einmal.",
        "err_rate": "Zu viele Anfragen. Bitte versuchen Sie es später noch einmal.",
        "not_found": "Diese Seite gibt es nicht.",
        "archive_title": "Archiv: versendete Rundbriefe",
        "archive_empty": "Noch ist nichts versendet worden.",
        "error_title": "Das hat nicht geklappt",
        "error": "Ein Fehler ist aufgetreten. Bitte versuchen Sie es später noch einmal.",
        "back": "Zur Anmeldung",
        "impressum": "Impressum",
        "privacy": "Datenschutz: Es gilt das Datenschutzgesetz der EKD (DSG-EKD). Auskunft und "
                   "Löschung: {email}",
        "list_newsletter": "IMAG-Newsletter",
        "partner_list": "Verteiler des Trägerkreises IMAG",
        "mail_subject": "Bitte bestätigen Sie Ihre Anmeldung",
        "mail_hello": "Guten Tag {name},",
        "mail_hello_anon": "Guten Tag,",
        "mail_body": "jemand – hoffentlich Sie – hat diese Adresse für {lists} angemeldet. Bitte "
                     "bestätigen Sie die Anmeldung mit diesem Link (gültig 7 Tage):",
        "mail_button": "Anmeldung bestätigen",
        "mail_ignore": "Wenn Sie sich nicht angemeldet haben, ignorieren Sie diese E-Mail einfach: "
                       "ohne Bestätigung erhalten Sie nichts weiter.",
    },
    "en": {
        "tagline": "Integration with heads held high · Dortmund",
        "subscribe_title": "Subscribe to the newsletter",
        "subscribe_intro": "Invitations to the Dortmund integration conferences, “Wir ALLE sind "
                           "Dortmund”, FORUM INTEGRATION and the intercultural street festivals "
                           "– about once a month, free of charge, cancel at any time.",
        "email": "Email address",
        "name": "Name (optional)",
        "language": "Language of the emails",
        "lists": "What would you like to receive?",
        "consent": "Yes, I would like to receive the selected emails from the IMAG network. I can "
                   "withdraw my consent at any time with the link in every email. Address, name, "
                   "language and the time and IP address of this sign-up are stored as proof.",
        "submit": "Subscribe",
        "thanks_title": "Almost done",
        "thanks": "If the address can receive email, we have just sent a confirmation link to it. "
                  "You are subscribed only once you open it. The link is valid for 7 days.",
        "confirmed_title": "Subscription confirmed",
        "confirmed": "Thank you! You will receive our emails from now on. You can unsubscribe with "
                     "one click in every email.",
        "already": "This subscription is already confirmed. There is nothing more to do.",
        "unsubscribe_howto": "This page does not know your address. To unsubscribe, please use the"
                             " “Unsubscribe” link in your own copy of the email – it works for "
                             "your address only. Or send us an email with the subject "
                             "“Unsubscribe”.",
        "unsubscribe_mail": "Write an email to unsubscribe",
        "confirm_title": "Confirm your subscription",
        "confirm_ask": "Do you want to subscribe {email} to “{lists}”? Only the button confirms "
                       "the subscription.",
        "confirm_button": "Yes, confirm my subscription",
        "invalid_title": "This link does not work",
        "invalid": "The link is incomplete, altered or expired. Nothing was changed. Please "
                   "subscribe again if you wish.",
        "unsubscribe_title": "Unsubscribe",
        "unsubscribe_ask": "Do you want to unsubscribe {email} from this list: {list}?",
        "unsubscribe_button": "Yes, unsubscribe",
        "unsubscribed_title": "You are unsubscribed",
        "unsubscribed": "{email} will no longer receive emails from this list: {list}.",
        "preferences_title": "Preferences",
        "preferences_intro": "Preferences for {email}",
        "save": "Save",
        "saved": "Your preferences have been saved.",
        "unsubscribe_all": "Unsubscribe from all lists",
        "unsubscribed_all": "{email} will no longer receive any emails from the IMAG network.",
        "preferences_link": "Change preferences",
        "err_email": "Please enter a valid email address.",
        "err_name": "The name may be at most 100 characters long, without web or email "
                    "addresses, line breaks or the characters @ < > , ; :",
        "err_language": "Please choose a language from the list.",
        "err_lists": "Please choose at least one list.",
        "err_form": "The form has expired. Please reload the page and send it again.",
        "err_rate": "Too many requests. Please try again later.",
        "not_found": "This page does not exist.",
        "archive_title": "Archive: newsletters sent",
        "archive_empty": "Nothing has been sent yet.",
        "error_title": "That did not work",
        "error": "Something went wrong. Please try again later.",
        "back": "Back to the sign-up",
        "impressum": "Legal notice",
        "privacy": "Data protection: the data protection law of the EKD (DSG-EKD) applies. Access "
                   "and erasure: {email}",
        "list_newsletter": "IMAG newsletter",
        "partner_list": "mailing list of the IMAG network",
        "mail_subject": "Please confirm your subscription",
        "mail_hello": "Hello {name},",
        "mail_hello_anon": "Hello,",
        "mail_body": "someone – hopefully you – signed this address up for {lists}. Please "
                     "confirm with this link (valid for 7 days):",
        "mail_button": "Confirm subscription",
        "mail_ignore": "If you did not sign up, simply ignore this email: without confirmation "
                       "you will not receive anything else.",
    },
    "tr": {
        "tagline": "Dik duruşla entegrasyon · Dortmund",
        "subscribe_title": "Bültene abone olun",
        "subscribe_intro": "Dortmund Entegrasyon Konferansları, „Wir ALLE sind Dortmund“, FORUM "
                           "INTEGRATION ve kültürlerarası sokak şenliklerine davetler – ayda "
                           "yaklaşık bir kez, ücretsiz, istediğiniz zaman iptal edilebilir.",
        "email": "E-posta adresi",
        "name": "Ad (isteğe bağlı)",
        "language": "E-postaların dili",
        "lists": "Neler almak istersiniz?",
        "consent": "Evet, IMAG ağının seçilen e-postalarını almak istiyorum. Onayımı her "
                   "e-postadaki bağlantıyla istediğim zaman geri alabilirim. Adres, ad, dil ile "
                   "kaydın zamanı ve IP adresi kanıt olarak saklanır.",
        "submit": "Abone ol",
        "thanks_title": "Neredeyse tamam",
        "thanks": "Adres e-posta alabiliyorsa, az önce oraya bir onay bağlantısı gönderdik. "
                  "Aboneliğiniz ancak bağlantıyı açtığınızda başlar. Bağlantı 7 gün geçerlidir.",
        "confirmed_title": "Abonelik onaylandı",
        "confirmed": "Teşekkürler! Bundan sonra e-postalarımızı alacaksınız. Her e-postadaki tek "
                     "tıkla abonelikten çıkabilirsiniz.",
        "already": "Bu abonelik zaten onaylanmış. Başka bir şey yapmanız gerekmiyor.",
        "unsubscribe_howto": "Bu sayfa adresinizi bilmiyor. Abonelikten çıkmak için lütfen kendi "
                             "e-postanızdaki „Abonelikten çık“ bağlantısını kullanın – yalnızca "
                             "sizin adresiniz için geçerlidir. Ya da bize „Abonelikten çık“ konulu"
                             " bir e-posta gönderin.",
        "unsubscribe_mail": "Abonelikten çıkmak için e-posta yazın",
        "confirm_title": "Aboneliği onaylayın",
        "confirm_ask": "{email} adresini „{lists}“ için kaydetmek istiyor musunuz? Abonelik ancak "
                       "düğmeye bastığınızda onaylanır.",
        "confirm_button": "Evet, aboneliği onayla",
        "invalid_title": "Bu bağlantı çalışmıyor",
        "invalid": "Bağlantı eksik, değiştirilmiş veya süresi dolmuş. Hiçbir şey değiştirilmedi. "
                   "İsterseniz lütfen yeniden abone olun.",
        "unsubscribe_title": "Abonelikten çık",
        "unsubscribe_ask": "{email} adresini bu listeden çıkarmak istiyor musunuz: {list}?",
        "unsubscribe_button": "Evet, abonelikten çık",
        "unsubscribed_title": "Abonelikten çıktınız",
        "unsubscribed": "{email} artık bu listenin e-postalarını almayacak: {list}.",
        "preferences_title": "Ayarlar",
        "preferences_intro": "{email} için ayarlar",
        "save": "Kaydet",
        "saved": "Ayarlarınız kaydedildi.",
        "unsubscribe_all": "Tüm listelerden çık",
        "unsubscribed_all": "{email} artık IMAG ağından hiçbir e-posta almayacak.",
        "preferences_link": "Ayarları değiştir",
        "err_email": "Lütfen geçerli bir e-posta adresi girin.",
        "err_name": "Ad en fazla 100 karakter olabilir; web veya e-posta adresi, satır sonu ya "
                    "da @ < > , ; : karakterlerini içeremez.",
        "err_language": "Lütfen listeden bir dil seçin.",
        "err_lists": "Lütfen en az bir liste seçin.",
        "err_form": "Formun süresi doldu. Lütfen sayfayı yenileyip tekrar gönderin.",
        "err_rate": "Çok fazla istek. Lütfen daha sonra tekrar deneyin.",
        "not_found": "Bu sayfa mevcut değil.",
        "archive_title": "Arşiv: gönderilen bültenler",
        "archive_empty": "Henüz hiçbir şey gönderilmedi.",
        "error_title": "Bu işe yaramadı",
        "error": "Bir hata oluştu. Lütfen daha sonra tekrar deneyin.",
        "back": "Kayıt sayfasına dön",
        "impressum": "Künye",
        "privacy": "Veri koruma: EKD veri koruma yasası (DSG-EKD) geçerlidir. Bilgi ve silme: "
                   "{email}",
        "list_newsletter": "IMAG bülteni",
        "partner_list": "IMAG ağının dağıtım listesi",
        "mail_subject": "Lütfen aboneliğinizi onaylayın",
        "mail_hello": "Merhaba {name},",
        "mail_hello_anon": "Merhaba,",
        "mail_body": "birisi – umarız sizsiniz – bu adresi {lists} için kaydetti. Lütfen bu "
                     "bağlantıyla onaylayın (7 gün geçerli):",
        "mail_button": "Aboneliği onayla",
        "mail_ignore": "Kaydolmadıysanız bu e-postayı dikkate almayın: onay olmadan başka bir şey "
                       "almayacaksınız.",
    },
    "ar": {
        "tagline": "الاندماج برؤوس مرفوعة · دورتموند",
        "subscribe_title": "الاشتراك في النشرة الإخبارية",
        "subscribe_intro": "دعوات إلى مؤتمرات الاندماج في دورتموند، و«Wir ALLE sind Dortmund»، "
                           "و«FORUM INTEGRATION»، ومهرجانات الشوارع بين الثقافات – مرة في الشهر "
                           "تقريبًا، مجانًا، ويمكن إلغاؤها في أي وقت.",
        "email": "البريد الإلكتروني",
        "name": "الاسم (اختياري)",
        "language": "لغة الرسائل",
        "lists": "ماذا تريد أن تتلقى؟",
        "consent": "نعم، أرغب في تلقي الرسائل المختارة من شبكة IMAG. يمكنني سحب موافقتي في أي وقت "
                   "عبر الرابط الموجود في كل رسالة. يُحفظ العنوان والاسم واللغة ووقت التسجيل "
                   "وعنوان IP كإثبات.",
        "submit": "اشترك",
        "thanks_title": "اقتربنا من الانتهاء",
        "thanks": "إذا كان العنوان يستقبل الرسائل، فقد أرسلنا إليه للتو رابط تأكيد. لن يبدأ "
                  "اشتراكك إلا بعد فتحه. الرابط صالح لمدة 7 أيام.",
        "confirmed_title": "تم تأكيد الاشتراك",
        "confirmed": "شكرًا لك! ستتلقى رسائلنا من الآن. يمكنك إلغاء الاشتراك بنقرة واحدة في كل "
                     "رسالة.",
        "already": "هذا الاشتراك مؤكد بالفعل. لا داعي لفعل أي شيء آخر.",
        "unsubscribe_howto": "هذه الصفحة لا تعرف عنوانكم. لإلغاء الاشتراك يُرجى استخدام رابط "
                             "«إلغاء الاشتراك» في رسالتكم الخاصة، فهو صالح لعنوانكم فقط. أو أرسلوا"
                             " إلينا رسالة بعنوان «إلغاء الاشتراك».",
        "unsubscribe_mail": "كتابة رسالة لإلغاء الاشتراك",
        "confirm_title": "تأكيد الاشتراك",
        "confirm_ask": "هل تريد اشتراك {email} في «{lists}»؟ لا يتأكد الاشتراك إلا بالضغط "
                       "على الزر.",
        "confirm_button": "نعم، أكِّد اشتراكي",
        "invalid_title": "هذا الرابط لا يعمل",
        "invalid": "الرابط غير مكتمل أو معدَّل أو منتهي الصلاحية. لم يتغير شيء. يُرجى الاشتراك "
                   "من جديد إن رغبت.",
        "unsubscribe_title": "إلغاء الاشتراك",
        "unsubscribe_ask": "هل تريد إلغاء اشتراك {email} من هذه القائمة: {list}؟",
        "unsubscribe_button": "نعم، ألغِ الاشتراك",
        "unsubscribed_title": "تم إلغاء اشتراكك",
        "unsubscribed": "لن يتلقى {email} رسائل هذه القائمة بعد الآن: {list}.",
        "preferences_title": "الإعدادات",
        "preferences_intro": "إعدادات {email}",
        "save": "حفظ",
        "saved": "تم حفظ إعداداتك.",
        "unsubscribe_all": "إلغاء الاشتراك من جميع القوائم",
        "unsubscribed_all": "لن يتلقى {email} أي رسائل من شبكة IMAG بعد الآن.",
        "preferences_link": "تغيير الإعدادات",
        "err_email": "يُرجى إدخال عنوان بريد إلكتروني صالح.",
        "err_name": "يجب ألا يزيد الاسم عن 100 حرف، وألا يحتوي على عناوين ويب أو بريد "
                    "إلكتروني أو فواصل أسطر أو الرموز ‎@ < > , ; :",
        "err_language": "يُرجى اختيار لغة من القائمة.",
        "err_lists": "يُرجى اختيار قائمة واحدة على الأقل.",
        "err_form": "انتهت صلاحية النموذج. يُرجى إعادة تحميل الصفحة وإرساله مرة أخرى.",
        "err_rate": "طلبات كثيرة جدًا. يُرجى المحاولة لاحقًا.",
        "not_found": "هذه الصفحة غير موجودة.",
        "archive_title": "الأرشيف: النشرات المرسلة",
        "archive_empty": "لم يُرسل شيء بعد.",
        "error_title": "لم ينجح ذلك",
        "error": "حدث خطأ. يُرجى المحاولة لاحقًا.",
        "back": "العودة إلى صفحة الاشتراك",
        "impressum": "بيانات الناشر",
        "privacy": "حماية البيانات: يسري قانون حماية البيانات للكنيسة الإنجيلية في ألمانيا "
                   "(DSG-EKD). للاستعلام والحذف: {email}",
        "list_newsletter": "نشرة IMAG الإخبارية",
        "partner_list": "قائمة شبكة IMAG",
        "mail_subject": "يُرجى تأكيد اشتراكك",
        "mail_hello": "مرحبًا {name}،",
        "mail_hello_anon": "مرحبًا،",
        "mail_body": "قام شخص ما – نأمل أن تكون أنت – بتسجيل هذا العنوان في {lists}. يُرجى "
                     "التأكيد عبر هذا الرابط (صالح لمدة 7 أيام):",
        "mail_button": "تأكيد الاشتراك",
        "mail_ignore": "إذا لم تقم بالتسجيل، فتجاهل هذه الرسالة ببساطة: بدون تأكيد لن تتلقى أي "
                       "شيء آخر.",
    },
}


def strings(lang: str) -> dict[str, str]:
    """The strings of a language, German for any key or language not translated."""
    return {**STRINGS["de"], **STRINGS.get(lang, {})}


def text_dir(lang: str) -> str:
    return "rtl" if lang in RTL else "ltr"


def list_title(list_name: str, lang: str, titles: Mapping[str, Any] | None = None) -> str:
    """A list's name as people read it: config `lists.<name>.title` in `lang` (else its first
    language), else a built-in title, else a neutral phrase: never the internal file name."""
    configured = titles.get(list_name) if titles else None
    title: dict[str, str] = getattr(configured, "title", None) or {}
    if title:
        return title.get(lang) or next(iter(title.values()))
    t = strings(lang)
    return t.get(f"list_{list_name}") or t["partner_list"]


def negotiate(accept_language: str, available: Iterable[str], default: str = "de") -> str:
    """Pick the best of `available` for an Accept-Language header (RFC 9110 §12.5.4)."""
    offered = list(available)
    best, best_q = default if default in offered else (offered[0] if offered else default), 0.0
    for part in accept_language.split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        lang = tag.strip().lower().split("-")[0]
        weight = 1.0
        if params.strip().startswith("q="):
            try:
                weight = float(params.strip()[2:])
            except ValueError:
                continue
        if lang in offered and weight > best_q:
            best, best_q = lang, weight
    return best
