"""Privacy end to end: every identifying DICOM attribute, through every command, reaches no output.

DICOM files (single-frame CR and DX images, a CT series, a multi-frame MR volume, and three files that fail: one
without pixel data, one truncated, one whose pixel data cannot be decoded) carry a distinct value in every attribute
of DICOM PS3.15 Annex E's Basic Application Level Confidentiality Profile (Table E.1-1) that pydicom can name, plus a
private element and an overlay comment; folders and files are named after the patient (name, ID, study date,
accession number, series description), as PACS exports do. The whole chain then runs through ``medssl.cli.main``
with debug logging (``medssl -v``): ``manifest scan`` (with a labels CSV keyed by path; and a second scan of one
patient's folder, a one-patient export whose root is named after the patient), ``manifest validate``,
``manifest preprocess`` (the cache), ``pretrain`` (2 steps of the tiny joint model: 2D and 3D streams, pictures,
checkpoint, local MLflow store), ``export`` (MONAI bundle, logged to the run), ``finetune`` (classification: one step
of full fine-tuning from the bundle) and ``evaluate`` (linear and kNN probes of the bundle: report, results and plot,
logged to MLflow). Every step takes the DICOM data as it is (3D rows enter the classification as their middle slice).

Then every file written (manifest, errors CSVs, cache, MLflow store and artifacts, run outputs and checkpoints,
bundle, finetune and evaluate outputs, anything written into the working directory), every file and folder name, the
console (captured at the file descriptors, so messages of C/C++ readers too) and the log records are searched for
every value: raw bytes (which is what Latin-1 decoding reads), UTF-8 and UTF-16 text, compressed zip members (and the
small members of a checkpoint), gunzipped bytes and PNG text chunks, ignoring case; person names by each component,
dates as YYYYMMDD, YYYY-MM-DD, DD.MM.YYYY and MM/DD/YYYY, times with their (unique) fraction of a second, with or
without colons (and the date and the time inside each DateTime), UIDs by their root, and unkeyed SHA-256 digests of
every value; and for the pseudonymisation salt. medssl writes no log file of its own (progress and logs go to the
console), so the captured console and log records are all of it. Only the private path maps ``<manifest>.paths.csv``
may hold identifiers, and each holds exactly those its paths (and its root) carry. The manifest's documented
``series`` column (an unkeyed digest of the SeriesInstanceUID of DICOM series rows) is the one digest allowed. A
failure lists, per output, the values found and the attribute and file each came from.

The MLflow store is the local SQLite store with its artifacts beside it (MLflow 3 refuses the plain-folder store
without ``MLFLOW_ALLOW_FILE_STORE``; SQLite is medssl's default). Values that cannot be made unique are written but
not searched: binary US numbers (PregnancyStatus, GPSAltitudeRef) and ages (AS: PatientAge, SelectorASValue).
Annex E attributes newer than pydicom's dictionary have no keyword and are left out; MediaStorageSOPInstanceUID
(file meta) is the SOPInstanceUID; the command-group UIDs (0000,xxxx) cannot be stored in a file.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from training import tiny_overrides

from medssl.cli import main
from medssl.data.pathmap import default_map_path

SALT = "phi-end-to-end-salt"  # a secret: searched for in every output too (lower case, as the search compares)

# The attributes of DICOM PS3.15 Annex E, Table E.1-1 ("Application Level Confidentiality Profile Attributes"), that
# the Basic Application Level Confidentiality Profile removes, empties, replaces or cleans, by pydicom 3 keyword: the
# table's 643 single-tag rows (2025 edition) less the 24 that pydicom's dictionary has no keyword for yet and the three
# that a stored file cannot set itself, AffectedSOPInstanceUID and RequestedSOPInstanceUID (command group 0000) and
# MediaStorageSOPInstanceUID (file meta: it is the SOPInstanceUID). The table's other rows, the repeating groups
# (50xx curves, 60xx overlay data and comments) and private attributes, are represented by an overlay comment and a
# private element (see ``Patient.write``).
_TABLE_E_1_1 = """
AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate AcquisitionDateTime
AcquisitionDeviceProcessingDescription AcquisitionFieldOfViewLabel AcquisitionProtocolDescription
AcquisitionTime AcquisitionUID ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial AdmissionID
AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime Allergies
AnnotationGroupDescription AnnotationGroupLabel AnnotationGroupUID ApprovalStatusDateTime Arbitrary
AssertionDateTime AssertionExpirationDateTime AttributeModificationDateTime AuthorObserverSequence BarcodeValue
BeamDescription BeamHoldTransitionDateTime BolusDescription BranchOfService CalibrationDate CalibrationDateTime
CalibrationTime CameraOwnerName CassetteID CertificateOfSigner CertifiedTimestamp
ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolEthicsCommitteeApprovalNumber
ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialProtocolName
ClinicalTrialSeriesDescription ClinicalTrialSeriesID ClinicalTrialSiteID ClinicalTrialSiteName
ClinicalTrialSponsorName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialTimePointDescription
ClinicalTrialTimePointID CommentsOnRadiationDose CommentsOnThePerformedProcedureStep CompensatorDescription
ConcatenationUID ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConceptualVolumeUID
ConfidentialityConstraintOnPatientDataDescription ConstituentConceptualVolumeUID
ConsultingPhysicianIdentificationSequence ConsultingPhysicianName ContainerComponentID ContainerDescription
ContainerIdentifier ContentCreatorIdentificationCodeSequence ContentCreatorName ContentDate ContentSequence
ContentTime ContextGroupLocalVersion ContextGroupVersion ContrastBolusAgent ContrastBolusStartTime
ContrastBolusStopTime ContributionDateTime ContributionDescription CountryOfResidence CreationDate CreationTime
CurrentObserverTrial CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence
DataSetTrailingPadding Date DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration
DateOfLastDetectorCalibration DateOfManufacture DateOfSecondaryCapture DateTime DateTimeOfLastCalibration
DecayCorrectionDateTime DecompositionDescription DerivationDescription DestinationAE DetectorID
DeviceAlternateIdentifier DeviceDescription DeviceLabel DeviceSerialNumber DeviceSettingDescription DeviceUID
DigitalSignatureDateTime DigitalSignatureUID DigitalSignaturesSequence DimensionOrganizationUID DischargeDate
DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel DistributionAddress DistributionName
DoseReferenceDescription DoseReferenceUID DosimetricObjectiveUID EffectiveDateTime EncapsulatedDocument
EndAcquisitionDateTime EntityDescription EntityLabel EntityLongLabel EntityName
EquipmentFrameOfReferenceDescription EthicsCommitteeApprovalEffectivenessEndDate
EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup EthnicGroupCodeSequence ExclusionStartDateTime
ExpectedCompletionDateTime FailedSOPInstanceUIDList FiducialUID FillerOrderNumberImagingServiceRequest
FilterLookupTableDescription FindingsGroupRecordingDateTrial FindingsGroupRecordingTimeTrial FirstTreatmentDate
FixationDeviceDescription FlowIdentifier FlowIdentifierSequence FractionGroupDescription FractionationNotes
FrameAcquisitionDateTime FrameComments FrameOfReferenceUID FrameOriginTimestamp FrameReferenceDateTime
FunctionalSyncPulse GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing
GPSDestBearingRef GPSDestDistance GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude
GPSDestLongitudeRef GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude
GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed GPSSpeedRef GPSStatus
GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID GraphicAnnotationSequence
HL7DocumentEffectiveTime HangingProtocolCreationDateTime HumanPerformerName HumanPerformerOrganization
IconImageSequence IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
ImpedanceMeasurementDateTime Impressions InformationIssueDateTime InstanceCoercionDateTime InstanceCreationDate
InstanceCreationTime InstanceCreatorUID InstanceOriginStatus InstitutionAddress InstitutionCodeSequence
InstitutionName InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InstructionPerformedDateTime
InsurancePlanIdentification IntendedFractionStartTime IntendedPhaseEndDate IntendedPhaseStartDate
IntendedRecipientsOfResultsIdentificationSequence InterlockDateTime InterlockDescription
InterlockOriginDescription InterpretationApprovalDate InterpretationApprovalTime InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder InterpretationText
InterpretationTranscriber InterpretationTranscriptionDate InterpretationTranscriptionTime
InterventionDrugStartTime InterventionDrugStopTime IrradiationEventUID IssueDateOfImagingServiceRequest
IssueTimeOfImagingServiceRequest IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfClinicalTrialProtocolID
IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID IssuerOfClinicalTrialSubjectID
IssuerOfClinicalTrialSubjectReadingID IssuerOfClinicalTrialTimePointID IssuerOfPatientID
IssuerOfServiceEpisodeID IssuerOfServiceEpisodeIDSequence IssuerOfTheContainerIdentifierSequence
IssuerOfTheSpecimenIdentifierSequence LabelText LargePaletteColorLookupTableUID LastMenstrualDate LensMake
LensModel LensSerialNumber LensSpecification LongDeviceDescription MAC MakerNote ManufacturerDeviceClassUID
ManufacturerDeviceIdentifier MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedAttributesSequence
ModifiedImageDate ModifiedImageDescription ModifiedImageTime ModifyingDeviceID ModifyingSystem
MostRecentTreatmentDate MultienergyAcquisitionDescription MultiplexGroupUID NameOfPhysiciansReadingStudy
NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
NonconformingModifiedAttributesSequence ObservationDateTime ObservationDateTrial ObservationStartDateTime
ObservationSubjectUIDTrial ObservationTimeTrial ObservationUID Occupation OperatorIdentificationSequence
OperatorsName OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
OriginalAttributesSequence Originator OtherClinicalTrialProtocolIDsSequence OtherPatientIDs
OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime OverrideDateTime PaletteColorLookupTableUID
ParticipantSequence ParticipationDateTime PatientAddress PatientAge PatientBirthDate PatientBirthName
PatientBirthTime PatientComments PatientID PatientInstitutionResidence PatientInsurancePlanCodeSequence
PatientMotherBirthName PatientName PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
PatientReligiousPreference PatientSetupPhotoDescription PatientSetupUID PatientSex PatientSexNeutered
PatientSize PatientState PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements
PatientTreatmentPreparationMethodDescription PatientTreatmentPreparationProcedureParameterDescription
PatientWeight PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepEndDate
PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime
PerformedStationAETitle PerformedStationGeographicLocationCodeSequence PerformedStationName
PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
PersonIdentificationCodeSequence PersonName PersonTelecomInformation PersonTelephoneNumbers
PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
PhysiciansReadingStudyIdentificationSequence PlacerOrderNumberImagingServiceRequest PlateID
PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication PregnancyStatus
PrescriptionDescription PrescriptionNotes PrescriptionNotesSequence PresentationCreationDate
PresentationCreationTime PresentationDisplayCollectionUID PresentationSequenceCollectionUID
PriorTreatmentDoseDescription ProcedureStepCancellationDateTime ProductExpirationDateTime ProtocolName
PyramidDescription PyramidLabel PyramidUID ROICreatorSequence ROIDateTime ROIDescription
ROIGenerationDescription ROIInterpreter ROIInterpreterSequence ROIName ROIObservationDateTime
ROIObservationDescription ROIObservationLabel RTAccessoryDeviceSlotID RTAccessoryHolderSlotID
RTPhysicianIntentNarrative RTPlanDate RTPlanDescription RTPlanLabel RTPlanName RTPlanTime RTPrescriptionLabel
RTToleranceSetLabel RTTreatmentApproachLabel RTTreatmentPhaseUID RadiationDoseIdentificationLabel
RadiationDoseInVivoMeasurementLabel RadiationGenerationModeDescription RadiationGenerationModeLabel
RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime
RadiopharmaceuticalStopTime ReasonForOmissionDescription ReasonForRequestedProcedureCodeSequence ReasonForStudy
ReasonForSuperseding ReasonForTheAttributeModification ReasonForTheImagingServiceRequest
ReasonForTheRequestedProcedure ReasonForVisit ReasonForVisitCodeSequence ReceivingAE
RecordedRTControlPointDateTime ReferencedConceptualVolumeUID ReferencedDateTime
ReferencedDigitalSignatureSequence ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID
ReferencedFiducialsUID ReferencedFrameOfReferenceUID
ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedImageSequence
ReferencedObservationUIDTrial ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
ReferencedPatientSequence ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence
ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedStudySequence
ReferencedTreatmentPositionGroupUID ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
ReferringPhysicianName ReferringPhysicianTelephoneNumbers RegionOfResidence RelatedFrameOfReferenceUID
RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription
RequestedProcedureID RequestedProcedureLocation RequestedSeriesDescription RequestingAE RequestingPhysician
RequestingService RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization ResponsiblePerson
ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer RetrieveAETitle ReviewDate ReviewTime
ReviewerName SOPAuthorizationDateTime SOPInstanceUID SafePositionExitDate SafePositionExitTime
SafePositionReturnDate SafePositionReturnTime ScheduledAdmissionDate ScheduledAdmissionTime
ScheduledDischargeDate ScheduledDischargeTime ScheduledHumanPerformersSequence
ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
ScheduledPerformingPhysicianName ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
ScheduledProcedureStepEndTime ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID
ScheduledProcedureStepLocation ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
ScheduledStudyLocation ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime
ScheduledStudyStopDate ScheduledStudyStopTime SelectorAEValue SelectorASValue SelectorDAValue SelectorDTValue
SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue SelectorSTValue SelectorTMValue
SelectorUNValue SelectorURValue SelectorUTValue SeriesDate SeriesDescription SeriesInstanceUID SeriesTime
ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription ShieldingDeviceDescription SlideIdentifier
SmokingStatus SourceConceptualVolumeUID SourceEndDateTime SourceFrameOfReferenceUID SourceIdentifier
SourceImageSequence SourceManufacturer SourceOfPreviousValues SourceSerialNumber SourceStartDateTime
SourceStrengthReferenceDate SourceStrengthReferenceTime SpecialNeeds SpecimenAccessionNumber
SpecimenDetailedDescription SpecimenIdentifier SpecimenPreparationSequence SpecimenShortDescription SpecimenUID
StartAcquisitionDateTime StationAETitle StationName StorageMediaFileSetUID StructureSetDate
StructureSetDescription StructureSetLabel StructureSetName StructureSetTime StudyArrivalDate StudyArrivalTime
StudyComments StudyCompletionDate StudyCompletionTime StudyDate StudyDescription StudyID StudyIDIssuer
StudyInstanceUID StudyReadDate StudyReadTime StudyTime StudyVerifiedDate StudyVerifiedTime
SubstanceAdministrationDateTime SynchronizationFrameOfReferenceUID TableTopPositionAlignmentUID TargetUID
TelephoneNumberTrial TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TemplateLocalVersion
TemplateVersion TextComments TextString Time TimeOfDocumentCreationOrVerbalTransactionTrial
TimeOfLastCalibration TimeOfLastDetectorCalibration TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor
TopicKeywords TopicSubject TopicTitle TrackingUID TransactionUID TransducerIdentificationSequence
TreatmentControlPointDate TreatmentControlPointTime TreatmentDate TreatmentMachineName
TreatmentPositionGroupLabel TreatmentPositionGroupUID TreatmentSessionUID TreatmentSite TreatmentSites
TreatmentTechniqueNotes TreatmentTime TreatmentToleranceViolationDateTime TreatmentToleranceViolationDescription
UDISequence UID UniqueDeviceIdentifier UserContentLabel UserContentLongLabel
VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial VerificationDateTime
VerifyingObserverIdentificationCodeSequence VerifyingObserverName VerifyingObserverSequence
VerifyingOrganization VisitComments WaveformFilterDescription XRayDetectorID XRayDetectorLabel XRaySourceID
"""
ANNEX_E_ATTRIBUTES: tuple[str, ...] = tuple(_TABLE_E_1_1.split())

MARK = "Qzv"  # every text value is "Qzv" + a 5-digit serial number (+ a suffix): nothing else writes that
UID_ROOT = "2.999.7317"  # under the ISO/ITU-T "example" arc 2.999: no real UID starts with it
FIRST_DATE = dt.date(1801, 1, 1)  # dates from 1801 on: far from any timestamp, run name or metric
PERSON_PARTS = ("Fam", "Giv", "Mid", "Pre", "Suf")  # family, given, middle, prefix, suffix
UNSEARCHABLE_VRS = frozenset({"US", "AS"})  # binary numbers and ages: written, but not unique enough to search
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # ImageOrientationPatient


@dataclass
class Identifiers:
    """Hands out identifier values that cannot occur by chance, and remembers which attribute of which file (or
    patient) each one went into: its label, ``"<where> <Keyword>"``."""

    serial: int = 0
    labels: dict[int, str] = field(default_factory=dict)  # serial number (text, names, UIDs, numbers) -> label
    dates: dict[str, str] = field(default_factory=dict)  # YYYYMMDD -> label
    times: dict[str, str] = field(default_factory=dict)  # HHMMSS.FFFFFF -> label
    digests: dict[str, str] = field(default_factory=dict)  # first 12 hex digits of SHA-256(value) -> label
    secrets: dict[bytes, str] = field(default_factory=lambda: {SALT.encode(): "the pseudonymisation salt"})
    _shared_dates: dict[tuple[str, str], str] = field(default_factory=dict)

    def _new(self, label: str) -> int:
        self.serial += 1
        self.labels[self.serial] = label
        return self.serial

    def _remember(self, value: str, label: str) -> str:
        self.digests[hashlib.sha256(value.encode()).hexdigest()[:12]] = label
        return value

    def text(self, label: str, suffix: str = "") -> str:
        return self._remember(f"{MARK}{self._new(label):05d}{suffix}", label)

    def code(self, label: str) -> str:
        """A code string or AE title (upper case, at most 16 characters)."""
        return self._remember(f"{MARK.upper()}{self._new(label):05d}", label)

    def person(self, label: str) -> str:
        """A person name whose five components are all searchable."""
        serial = self._new(label)
        return self._remember("^".join(f"{MARK}{serial:05d}{part}" for part in PERSON_PARTS), label)

    def uid(self, label: str) -> str:
        return self._remember(f"{UID_ROOT}.{self._new(label)}", label)

    def decimal(self, label: str) -> str:
        return self._remember(f"73177.{self._new(label):05d}", label)

    def integer(self, label: str) -> str:
        return self._remember(f"7317{self._new(label):05d}", label)

    def date(self, label: str, key: tuple[str, str]) -> str:
        """A date, the same for one (attribute, patient): a study's files agree on it."""
        if key not in self._shared_dates:
            value = (FIRST_DATE + dt.timedelta(days=len(self._shared_dates))).strftime("%Y%m%d")
            self.dates[value] = label
            self._shared_dates[key] = self._remember(value, label)
        return self._shared_dates[key]

    def time(self, label: str) -> str:
        serial = self._new(label)
        seconds = serial * 7919 % 86400
        value = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{serial:06d}"
        self.times[value] = label
        return self._remember(value, label)


def annex_e_values(ids: Identifiers, where: str, patient: str) -> dict[str, Any]:
    """A value for every attribute of :data:`ANNEX_E_ATTRIBUTES`, of the VR pydicom's dictionary gives it."""
    values: dict[str, Any] = {}
    for keyword in ANNEX_E_ATTRIBUTES:
        label = f"{where} {keyword}"
        vr = dictionary_VR(keyword).split(" or ")[0]
        if vr == "SQ":
            item = Dataset()
            item.CodeValue = ids.text(f"{label}>CodeValue")
            item.CodingSchemeDesignator = "99QZV"
            item.CodeMeaning = ids.text(f"{label}>CodeMeaning", " meaning")
            item.ReferencedSOPInstanceUID = ids.uid(f"{label}>ReferencedSOPInstanceUID")
            value: Any = Sequence([item])
        elif vr == "PN":
            value = ids.person(label)
        elif vr == "DA":
            value = ids.date(label, (keyword, patient))
        elif vr == "TM":
            value = ids.time(label)
        elif vr == "DT":
            value = ids.date(label, (keyword, patient)) + ids.time(label)
        elif vr == "UI":
            value = ids.uid(label)
        elif vr == "DS":
            value = ids.decimal(label)
        elif vr == "IS":
            value = ids.integer(label)
        elif vr in ("CS", "AE"):
            value = ids.code(label)
        elif vr == "UR":
            value = f"https://{ids.text(label).lower()}.invalid/"
        elif vr in ("OB", "OW", "UN"):
            value = ids.text(label, " bytes!").encode()
        elif vr == "US":
            value = 4
        elif vr == "AS":
            value = "071Y"
        elif vr in ("SH", "LO", "ST", "LT", "UT", "UC"):
            value = ids.text(label, "" if vr == "SH" else " free text")
        else:  # pragma: no cover - a VR the table does not have today
            raise AssertionError(f"{keyword}: no value for VR {vr}")
        values[keyword] = value
    return values


def write_tagged_dicom(
    path: Path,
    pixels: np.ndarray | None,
    sop_class: str,
    attributes: Mapping[str, Any],
    elements: Mapping[int, tuple[str, Any]] | None = None,
    pixel_bytes: bytes | None = None,
) -> Path:
    """One DICOM Part 10 file through pydicom, with every attribute given (by keyword) and the extra ``elements``
    (tag -> (VR, value): private or repeating-group elements, which have no keyword).

    ``pixels``: ``[rows, columns]`` (one frame) or ``[frames, rows, columns]``, uint16 or int16; ``None`` writes no
    pixel data. ``pixel_bytes`` replaces the pixel data's bytes (to write a file whose pixels cannot be decoded).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    for tag, (vr, value) in (elements or {}).items():
        ds.add_new(tag, vr, value)
    ds.SOPClassUID = sop_class
    if pixels is not None:
        frames = pixels if pixels.ndim == 3 else pixels[None]
        ds.Rows, ds.Columns = (int(n) for n in frames.shape[1:])
        if pixels.ndim == 3:
            ds.NumberOfFrames = frames.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = int(pixels.dtype == np.int16)
        ds.PixelData = pixel_bytes if pixel_bytes is not None else np.ascontiguousarray(frames).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _image(seed: int, lesion: bool) -> np.ndarray:
    """A 48 x 40 radiograph-like image (uint16); ``lesion`` adds a bright spot (the label)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:40]
    image = 1400 + 1200 * np.exp(-(((x - 20) / 12) ** 2 + ((y - 24) / 14) ** 2)) + rng.normal(0, 120, size=y.shape)
    if lesion:
        image += 1500 * np.exp(-(((x - rng.uniform(12, 28)) / 3) ** 2 + ((y - rng.uniform(14, 34)) / 3) ** 2))
    return np.clip(image, 0, 4095).astype(np.uint16)


def _volume(seed: int, slices: int = 8) -> np.ndarray:
    """A body-like ellipsoid with bright blobs, ``[slices, 32, 32]`` int16."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:slices, 0:32, 0:32]
    body = ((xx - 16) / 13) ** 2 + ((yy - 16) / 11) ** 2 < 1
    volume = np.where(body, 300.0, 0.0) + rng.normal(0, 20, size=body.shape)
    for _ in range(3):
        c = rng.uniform([3, 8, 8], [slices - 3, 24, 24])
        volume[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 12) & body] += 400
    return np.clip(volume, 0, None).astype(np.int16)


@dataclass
class Patient:
    """One patient of the export: identity, study and the folder named after them."""

    ids: Identifiers
    key: str  # "patient<k>", the labels' prefix
    study: dict[str, Any]
    study_date: str
    folder: Path
    path_borne: set[str]  # labels of the values that folder and file names carry

    @classmethod
    def new(cls, ids: Identifiers, root: Path, k: int) -> Patient:
        key = f"patient{k}"
        pid = ids.text(f"{key} PatientID")
        name = ids.person(f"{key} PatientName")
        family, given = name.split("^")[:2]
        study = {
            "PatientID": pid,
            "PatientName": name,
            "AccessionNumber": ids.text(f"{key} AccessionNumber"),
            "StudyInstanceUID": ids.uid(f"{key} StudyInstanceUID"),
        }
        study_date = ids.date(f"{key} StudyDate", ("StudyDate", key))
        borne = {f"{key} {keyword}" for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyDate")}
        return cls(ids, key, study, study_date, root / f"{family.upper()}^{given.upper()}_{pid}", borne)

    @property
    def stem(self) -> str:
        """File names begin with the ID, the accession number and the family name."""
        family = self.study["PatientName"].split("^")[0]
        return f"{self.study['PatientID']}_{self.study['AccessionNumber']}_{family}"

    def series(self, modality: str, what: str) -> tuple[Path, dict[str, Any]]:
        """A series folder ``<StudyDate>_<modality>_<SeriesDescription>`` and its series-level attributes."""
        description = self.ids.text(f"{self.key} SeriesDescription")
        self.path_borne.add(f"{self.key} SeriesDescription")
        fixed = {
            **self.study,
            "Modality": modality,
            "SeriesDescription": description,
            "SeriesInstanceUID": self.ids.uid(f"{self.key} {what} SeriesInstanceUID"),
            "FrameOfReferenceUID": self.ids.uid(f"{self.key} {what} FrameOfReferenceUID"),
            "SeriesNumber": 1,
        }
        return self.folder / f"{self.study_date}_{modality}_{description}", fixed

    def write(self, where: str, path: Path, fixed: Mapping[str, Any], **kwargs: Any) -> Path:
        """A file with every Annex E attribute (``fixed`` overriding the patient, study and series ones), a private
        element and an overlay comment."""
        where = f"{self.key}/{where}"
        elements = {
            0x00090010: ("LO", "QZV TEST CREATOR"),  # a private block: Annex E removes private attributes too
            0x00091001: ("LO", self.ids.text(f"{where} private")),
            0x60004000: ("LT", self.ids.text(f"{where} OverlayComments", " free text")),
        }
        attributes = {**annex_e_values(self.ids, where, self.key), **fixed}
        return write_tagged_dicom(path, attributes=attributes, elements=elements, **kwargs)


@dataclass
class Archive:
    """A PACS-style export written by :func:`write_archive`."""

    root: Path
    labels_csv: Path
    ids: Identifiers
    path_borne: set[str]  # labels of the values that folder and file names carry
    complete: list[Path]  # the files that hold every attribute (the positive control reads them)
    folders: list[Path]  # the patients' folders


def write_archive(root: Path, labels_csv: Path) -> Archive:
    """Four patients: ``<FAMILY^GIVEN_ID>/<StudyDate>_<modality>_<SeriesDescription>/<ID>_<accession>_<family>...``.

    Every patient has a normal and a lesion image (CR for two patients, DX for two); patient 0 also has a CT series,
    patient 1 a multi-frame MR volume and a CR whose pixel data is too short to decode (a cache failure), patients 2
    and 3 a file without pixel data and a truncated one (scan errors). Labels: patients 0-2 ``train``, 3 ``test``.
    """
    ids = Identifiers()
    complete: list[Path] = []
    labels = ["path,label,split"]
    patients = [Patient.new(ids, root, k) for k in range(4)]

    def label(path: Path, value: str, split: str) -> None:
        labels.append(f"{Path(os.path.relpath(path, labels_csv.parent)).as_posix()},{value},{split}")

    for k, patient in enumerate(patients):
        split = "test" if k == 3 else "train"
        modality, sop_class = ("CR", CR_STORAGE) if k < 2 else ("DX", DX_STORAGE)
        folder, fixed = patient.series(modality, modality)
        for j, (lesion, value) in enumerate(((False, "normal"), (True, "lesion"))):
            path = patient.write(f"{modality}/{j}", folder / f"{patient.stem}_{j}.dcm",
                                 {**fixed, "InstanceNumber": j + 1, "ImagerPixelSpacing": [0.2, 0.2]},
                                 pixels=_image(10 * k + j, lesion), sop_class=sop_class)  # fmt: skip
            complete.append(path)
            label(path, value, split)
        if k == 0:  # a CT series, one file per slice
            folder, fixed = patient.series("CT", "CT")
            for z, pixels in enumerate(_volume(1)):
                geometry = {"InstanceNumber": z + 1, "ImagePositionPatient": [-16.0, -16.0, 2.5 * z],
                            "ImageOrientationPatient": AXIAL, "PixelSpacing": [1.0, 1.0],
                            "SliceThickness": 2.5}  # fmt: skip
                complete.append(patient.write(f"CT/{z}", folder / f"{patient.stem}_IM{z:04d}.dcm",
                                              {**fixed, **geometry}, pixels=pixels, sop_class=CT_STORAGE))  # fmt: skip
            label(folder, "normal", split)
        if k == 1:  # a multi-frame MR volume, and a CR whose pixel data is too short to decode
            folder, fixed = patient.series("MR", "MR")
            geometry = {"ImagePositionPatient": [-16.0, -16.0, 0.0], "ImageOrientationPatient": AXIAL,
                        "PixelSpacing": [1.0, 1.0], "SliceThickness": 2.0, "SpacingBetweenSlices": 2.0}  # fmt: skip
            path = patient.write("MR", folder / f"{patient.stem}_MF.dcm", {**fixed, **geometry}, pixels=_volume(2),
                                 sop_class=MR_STORAGE)  # fmt: skip
            complete.append(path)
            label(path, "lesion", split)
            folder, fixed = patient.series("CR", "broken")
            complete.append(patient.write("broken", folder / f"{patient.stem}_broken.dcm",
                                          {**fixed, "ImagerPixelSpacing": [0.2, 0.2]}, pixels=_image(99, False),
                                          pixel_bytes=b"\0" * 64, sop_class=CR_STORAGE))  # fmt: skip
        if k >= 2:  # scan errors: a file without pixel data (a report), a truncated image
            folder, fixed = patient.series("OT", "failing")
            complete.append(patient.write("report", folder / f"{patient.stem}_report.dcm", fixed, pixels=None,
                                          sop_class=DX_STORAGE))  # fmt: skip
            cut = patient.write("truncated", folder / f"{patient.stem}_cut.dcm", fixed, pixels=_image(98, False),
                                sop_class=DX_STORAGE)  # fmt: skip
            cut.write_bytes(cut.read_bytes()[:-1000])
    labels_csv.parent.mkdir(parents=True, exist_ok=True)
    labels_csv.write_text("\n".join(labels) + "\n")
    path_borne = set().union(*(p.path_borne for p in patients))
    return Archive(root, labels_csv, ids, path_borne, complete, [p.folder for p in patients])


# What a leaked value looks like in lower-cased bytes (each pattern's groups tell which value it is).
SERIAL = re.compile(rb"qzv(\d{5})[a-z]*")  # text, names (every component), codes, AE titles, URLs, byte values
UID = re.compile(re.escape(UID_ROOT.encode()) + rb"(?:\.(\d+))?")  # the root alone is a leak too
DATE = re.compile(rb"18\d\d([-/.]?)\d\d\1\d\d")  # YYYYMMDD, YYYY-MM-DD (or / or .); not after a digit or a point
DAY_FIRST = re.compile(rb"(\d\d)([-/.])(\d\d)\2(18\d\d)")  # DD.MM.YYYY or MM/DD/YYYY
FRACTION = re.compile(rb"\.(\d{6})")  # a time's fraction of a second: the quick test before TIME
TIME = re.compile(rb"(\d\d):?(\d\d):?(\d\d)\.(\d{6})$")  # HHMMSS.FFFFFF or HH:MM:SS.FFFFFF, alone or in a DateTime
NUMBER = re.compile(rb"73177\.(\d{5})|7317(\d{5})")  # decimal and integer strings
HEX = re.compile(rb"[0-9a-f]{12,}")  # where an unkeyed SHA-256 digest of a value would be
LARGE = 4 << 20  # bytes: larger items (weights, optimiser state) get the quick searches only, on their raw bytes


@dataclass(frozen=True)
class Finding:
    """An identifier found in an output."""

    where: str  # the output: a file (and the view of it: text decoding, archive member, PNG chunk) or the console
    found: str  # the text that matched
    label: str  # which attribute of which file (or patient) the value came from


def find_identifiers(data: bytes | str, ids: Identifiers, where: str, digests: bool = True) -> list[Finding]:
    """Every identifier of ``ids`` in ``data`` (any case); ``digests``: also unkeyed SHA-256 digests of them."""
    text = (data.encode("utf-8", "replace") if isinstance(data, str) else data).lower()
    found: list[Finding] = []

    def add(match: re.Match[bytes], label: str) -> None:
        found.append(Finding(where, match[0].decode("latin-1"), label))

    for secret, label in ids.secrets.items():
        found += [Finding(where, secret.decode(), label)] if secret in text else []
    for match in SERIAL.finditer(text):
        if int(match[1]) in ids.labels:
            add(match, ids.labels[int(match[1])])
    for match in UID.finditer(text):
        add(match, ids.labels.get(int(match[1] or 0), "the UID root"))
    for match in DATE.finditer(text):
        date = re.sub(rb"\D", b"", match[0]).decode()
        before = text[match.start() - 1 : match.start()] if match.start() else b""
        if date in ids.dates and (not before or before not in b"0123456789."):
            add(match, ids.dates[date])
    for match in DAY_FIRST.finditer(text):
        first, second, year = match[1].decode(), match[3].decode(), match[4].decode()
        for date in {year + second + first, year + first + second} & ids.dates.keys():
            add(match, ids.dates[date])
    for candidate in FRACTION.finditer(text):
        if (match := TIME.search(text, max(0, candidate.start() - 8), candidate.end())) is not None:
            time = b"".join(match.groups()[:3]).decode() + "." + match[4].decode()
            if time in ids.times:
                add(match, ids.times[time])
    for match in NUMBER.finditer(text):
        if int(match[1] or match[2]) in ids.labels:
            add(match, ids.labels[int(match[1] or match[2])])
    if digests:
        for match in HEX.finditer(text):
            run = match[0].decode()
            for start in range(len(run) - 11):
                if (label := ids.digests.get(run[start : start + 12])) is not None:
                    found.append(Finding(where, run, f"SHA-256 of {label}"))
    return found


def png_text(blob: bytes) -> Iterator[bytes]:
    """The text chunks of a PNG file (tEXt, zTXt, iTXt, decompressed) and its EXIF chunk."""
    position = 8
    while position + 8 <= len(blob):
        length = int.from_bytes(blob[position : position + 4], "big")
        kind, data = blob[position + 4 : position + 8], blob[position + 8 : position + 8 + length]
        position += 12 + length
        if kind in (b"tEXt", b"eXIf"):
            yield data
        elif kind == b"zTXt":
            keyword, _, rest = data.partition(b"\0")
            yield keyword + b"\n" + zlib.decompress(rest[1:])
        elif kind == b"iTXt":
            keyword, _, rest = data.partition(b"\0")
            compressed, (language, _, rest) = rest[0], rest[2:].partition(b"\0")
            translated, _, text = rest.partition(b"\0")
            yield b"\n".join((keyword, language, translated, zlib.decompress(text) if compressed else text))


def views(name: str, blob: bytes) -> Iterator[tuple[str, bytes, bool]]:
    """``(where, bytes, small)`` for every way a file's bytes can hold text: the bytes themselves (what Latin-1
    decoding reads), the UTF-8 and UTF-16 (both alignments) text they decode to, and, recursively, zip members that
    are compressed (or small members of a large zip: a checkpoint's pickle), gunzipped bytes and PNG text chunks."""
    small = len(blob) < LARGE
    yield name, blob, small
    if small:
        yield f"{name} (UTF-8 text)", blob.decode("utf-8", "ignore").encode(), True
        for offset in (0, 1):
            yield f"{name} (UTF-16 text, offset {offset})", blob[offset:].decode("utf-16-le", "ignore").encode(), True
    if blob[:2] == b"\x1f\x8b":
        yield from views(f"{name} (gunzipped)", gzip.decompress(blob))
    if blob[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            for member in archive.infolist():
                if member.compress_type != zipfile.ZIP_STORED or (not small and member.file_size < LARGE):
                    yield from views(f"{name}!{member.filename}", archive.read(member))
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        for k, chunk in enumerate(png_text(blob)):
            yield from views(f"{name} (PNG text chunk {k})", chunk)


def search_bytes(name: str, blob: bytes, ids: Identifiers) -> list[Finding]:
    """Identifiers in every view of a file's bytes (digests only in small items: text, pickles, metadata)."""
    return [found for where, data, small in views(name, blob) for found in find_identifiers(data, ids, where, small)]


def report(findings: list[Finding], shown: int = 4) -> str:
    """One line per output (file, name, console step, log): how many identifiers, and the first few of them."""
    by_output: dict[str, dict[str, None]] = {}
    for finding in findings:
        output = finding.where.split(" (")[0].split("!")[0]
        by_output.setdefault(output, {})[f"{finding.found!r} = {finding.label}"] = None
    lines = [f"{len(by_output)} outputs hold identifiers:"]
    for output, found in by_output.items():
        more = f"; and {len(found) - shown} more" if len(found) > shown else ""
        lines.append(f"  {output}: {'; '.join(list(found)[:shown])}{more}")
    return "\n".join(lines)


def keywords_found(findings: list[Finding]) -> set[str]:
    """The attributes (keywords, ``private``, ``OverlayComments``) whose values the findings are."""
    return {f.label.split(" ")[-1].split(">")[0] for f in findings if not f.label.startswith("SHA-256")}


SEARCHABLE = {"private", "OverlayComments"} | {
    k for k in ANNEX_E_ATTRIBUTES if dictionary_VR(k) not in UNSEARCHABLE_VRS
}


def test_no_dicom_identifier_reaches_any_output(tmp_path, monkeypatch, capfd, caplog):
    """Scan, validate, preprocess, pretrain, export, fine-tune and evaluate on the export; then no file written (but
    the path map, which holds the paths' identifiers only), no file or folder name, nor the console or the log holds
    an identifier."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # whatever lands in the working directory is searched too
    archive = write_archive(tmp_path / "archive", tmp_path / "inputs" / "labels.csv")
    ids = archive.ids
    for path in archive.complete:  # the control: every value is in its file, and the search finds it
        missing = SEARCHABLE - keywords_found(find_identifiers(path.read_bytes(), ids, path.name, digests=False))
        assert not missing, f"{path.name}: the search does not find {sorted(missing)}"

    console: list[tuple[str, str]] = []  # (step, what it printed)

    def medssl(*argv: str) -> str:
        code = main(["-v", *argv])  # debug logging, as `medssl -v`
        out, err = capfd.readouterr()
        console.append((" ".join(argv[:2] if argv[0] == "manifest" else argv[:1]), f"{out}\n{err}"))
        assert code == 0, f"medssl {argv[0]} exited with {code}:\n{out}\n{err}"
        return out

    manifest = tmp_path / "manifests" / "archive.csv"
    work = tmp_path / "work"
    cache, bundle, evaluation = work / "cache", work / "bundle", work / "evaluation"
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    medssl("manifest", "scan", str(archive.root), "--out", str(manifest), "--labels", str(archive.labels_csv),
           "--salt", SALT, "--workers", "2", "--no-progress")  # fmt: skip
    medssl("manifest", "validate", str(manifest))
    # a one-patient export: the archive root itself is named after the patient
    single = manifest.with_name("one-patient.csv")
    medssl("manifest", "scan", str(archive.folders[3]), "--out", str(single), "--salt", SALT, "--no-progress")
    out = medssl("manifest", "preprocess", str(manifest), "--cache", str(cache), "--set", "percentiles=[0,100]",
                 "--workers", "1", "--no-progress")  # fmt: skip
    assert "10 built, 0 already cached, 1 failed" in out  # the CR whose pixel data cannot be decoded
    medssl("pretrain", *tiny_overrides(manifest, work, "trainer.max_steps=2", "trainer.checkpoint_every=0"))
    (backbone,) = (work / "outputs").glob("*/backbone.pt")
    medssl("export", str(backbone.parent), "--out", str(bundle), "--tracking-uri", uri)
    data = [f"data.manifest={manifest}", f"data.cache_dir={cache}", "data.cache_workers=1",
            "data.preprocess.percentiles=[0,100]", "data.size=32", f"tracking_uri={uri}", "progress=false"]  # fmt: skip
    out = medssl("finetune", "protocol=finetune", "finetune.steps=1", "finetune.batch_size=4",
                 f"model.pretrained={bundle}", *data)  # fmt: skip
    assert "8 training labels (1), 2 test: AUROC" in out  # 2D images, the CT series and the MR volume
    medssl("evaluate", f"backbones={{pretrained: {bundle}}}", "protocols=[linear,knn]", "label_fractions=[1.0]",
           "seeds=[0]", f"out={evaluation}", *data)  # fmt: skip

    one_patient = {label for label in archive.path_borne if label.startswith("patient3 ")}
    path_maps = {default_map_path(manifest): archive.path_borne, default_map_path(single): one_patient}
    inputs = (archive.root, archive.labels_csv.parent)
    written = sorted(p for p in tmp_path.rglob("*") if not any(p == i or i in p.parents for i in inputs))
    files = [p for p in written if p.is_file()]
    assert {"archive.csv", "archive.errors.csv", "mlflow.db", "model.pt", "report.md"} <= {p.name for p in files}
    assert set(path_maps) <= set(files) and any(p.name.endswith(".errors.csv") and "cache" in p.parts for p in files)
    assert any(p.suffix == ".npy" for p in files) and any("artifacts" in p.parts and p.suffix == ".png" for p in files)
    findings: list[Finding] = []
    in_maps: dict[Path, set[str]] = {}  # path map -> labels of the identifiers it holds
    clean: set[str] = set()  # digests of contents already searched and found clean (copies of checkpoints, weights)
    for path in written:
        relative = path.relative_to(tmp_path).as_posix()
        findings += find_identifiers(relative, ids, f"the name {relative}")
        if path.is_dir():
            continue
        blob = path.read_bytes()
        if path in path_maps:
            in_maps[path] = {f.label for f in search_bytes(relative, blob, ids)}
        elif (digest := hashlib.sha256(blob).hexdigest()) not in clean:
            found = search_bytes(relative, blob, ids)
            findings += found
            clean |= set() if found else {digest}
    for k, (step, text) in enumerate(console, start=1):
        findings += find_identifiers(text, ids, f"the console of step {k}, medssl {step}")
    findings += find_identifiers(caplog.text, ids, "the log")
    # the documented exception: the manifest's `series` column, an unkeyed digest of a series' SeriesInstanceUID
    series = [f for f in findings if f.where.startswith("manifests/archive.csv") and f.label.startswith("SHA-256 of")
              and f.label.endswith("SeriesInstanceUID")]  # fmt: skip
    leaks = [f for f in findings if f not in series]
    assert not leaks, report(leaks)
    # a map names the files: it holds the identifiers that the paths carry (and its root), and no other
    for path_map, path_borne in path_maps.items():
        assert in_maps[path_map] == path_borne, f"{path_map.name}: {sorted(in_maps[path_map] ^ path_borne)}"
